package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/internal/testwait"
	"github.com/relaycar/relaycar/relay/spool"
)

// The data path end to end through the built binary: streaming intake of
// large messages, a crash in the middle of one, a disk filling up in the
// middle of one, and a spool left by the previous release.

// dpLineLen is the length of each filler line with its CRLF.
const dpLineLen = 78

// dpFiller returns about n bytes (whole lines) of deterministic printable
// lines ending in CRLF. With dots, some lines start with "." and one is a
// lone ".", which only survive SMTP if both sides dot-stuff correctly.
func dpFiller(n int, seed uint64, dots bool) []byte {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	lines := n / dpLineLen
	out := make([]byte, 0, lines*dpLineLen)
	line := make([]byte, dpLineLen-2)
	for i := range lines {
		for j := range line {
			line[j] = alphabet[rng.IntN(len(alphabet))]
		}
		switch {
		case dots && i == lines/2:
			out = append(out, '.')
			out = append(out, bytes.Repeat([]byte{'-'}, dpLineLen-3)...)
			out = append(out, '\r', '\n')
			continue
		case dots && i%997 == 0:
			line[0] = '.'
		}
		out = append(out, line...)
		out = append(out, '\r', '\n')
	}
	if dots && lines > 2 {
		// A line that is only a dot, in the middle of the message.
		i := (lines / 3) * dpLineLen
		copy(out[i:], ".\r\n")
		copy(out[i+3:], bytes.Repeat([]byte{'x'}, dpLineLen-5))
		copy(out[i+dpLineLen-2:], "\r\n")
	}
	return out
}

// dpHeader is the header section of a large test message.
func dpHeader(seq int, subject string) string {
	return fmt.Sprintf("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <large-%d.%d@tests.local>\r\nX-Test-Seq: %d\r\n\r\n",
		sender, recipient, subject, time.Now().Format(time.RFC1123Z), seq, time.Now().UnixNano(), seq)
}

// dpWrite writes b to c in 1 MiB chunks.
func dpWrite(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	for len(b) > 0 {
		n := min(len(b), 1<<20)
		if _, err := c.Write(b[:n]); err != nil {
			t.Fatalf("writing DATA: %v", err)
		}
		b = b[n:]
	}
}

// dpOpenData starts a transaction by hand and returns once the relay
// answered 354 to DATA; the caller writes the message at its own pace.
func dpOpenData(h *harness) *rawConn {
	h.t.Helper()
	r := h.dialRaw()
	r.c.SetDeadline(time.Now().Add(2 * time.Minute))
	r.expect(220)
	r.cmd(250, "EHLO tests.local")
	r.cmd(250, "MAIL FROM:<%s>", sender)
	r.cmd(250, "RCPT TO:<%s>", recipient)
	r.cmd(354, "DATA")
	return r
}

// dpLargeUnknown returns the largest .msg in dir whose id is not in known,
// and its size: a message being received.
func dpLargeUnknown(t *testing.T, dir string, known map[int]string) (string, int64) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("reading %s: %v", dir, err)
	}
	var (
		id   string
		size int64
	)
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".msg") {
			continue
		}
		cand := strings.TrimSuffix(name, ".msg")
		if slices.Contains(slices.Collect(maps.Values(known)), cand) {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		if fi.Size() > size {
			id, size = cand, fi.Size()
		}
	}
	return id, size
}

// dpLogHas reports whether one output line of the relay contains every
// one of subs.
func dpLogHas(h *harness, subs ...string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.ContainsFunc(h.lines, func(l string) bool {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				return false
			}
		}
		return true
	})
}

func dpHasID(entries []queueEntry, id string) bool {
	return slices.ContainsFunc(entries, func(e queueEntry) bool { return e.ID == id })
}

// A crash while a large message streams in: what was acknowledged before
// (and during) it is delivered exactly once after the restart, and the
// half-received message, never acknowledged, is never delivered, queued
// or dead-lettered; at most it is kept as .broken for a human.
func TestDataPath_Kill9MidDATAOfLargeMessage(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.Stop() // upstream down: accepted mail stays in the spool
	h := newHarness(t, fmt.Sprintf(`
listen: {max_message_bytes: 41943040}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 5, open_for: 1s}}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr))

	acked := map[int]string{} // seq -> spool id
	for seq := 1; seq <= 3; seq++ {
		acked[seq] = h.mustSend(sender, []string{recipient}, message(sender, recipient, seq, "before the large one"))
	}

	const bigSeq = 999
	body := dpFiller(30_000_000, 1, false)
	firstPart := (10_000_000 / dpLineLen) * dpLineLen
	r := dpOpenData(h)
	r.write(dpHeader(bigSeq, "large, interrupted"))
	dpWrite(t, r.c, body[:firstPart])

	// The relay streams the message into its final .msg name as it reads.
	var (
		partial     string
		partialSize int64
	)
	waitFor(t, 30*time.Second, "the in-progress .msg to pass 9 MB", func() bool {
		partial, partialSize = dpLargeUnknown(t, h.spool, acked)
		return partialSize > 9_000_000
	})
	t.Logf("in-progress message %s: %d bytes on disk of %d sent", partial, partialSize, firstPart)

	// The relay keeps serving meanwhile, and this one is acknowledged.
	acked[4] = h.mustSend(sender, []string{recipient}, message(sender, recipient, 4, "during the large one"))
	if q := h.api("/api/queue"); dpHasID(q, partial) {
		t.Errorf("/api/queue lists %s before its DATA ended", partial)
	}
	// Still in flight: the file is there and the client has no reply.
	if fi, err := os.Stat(filepath.Join(h.spool, partial+".msg")); err != nil || fi.Size() <= 1<<20 {
		t.Fatalf("in-progress file at the kill: %v, %v; want more than 1 MiB", fi, err)
	}

	h.kill9()

	// The client finishes its message, or tries to: the connection is
	// broken and no 250 ever comes.
	r.c.SetDeadline(time.Now().Add(10 * time.Second))
	var werr error
	for off := firstPart; off < len(body) && werr == nil; off += 1 << 20 {
		_, werr = r.c.Write(body[off:min(off+1<<20, len(body))])
	}
	if werr == nil {
		_, werr = io.WriteString(r.c, ".\r\n")
	}
	code, msg, rerr := r.tp.ReadResponse(0)
	var ne net.Error
	switch {
	case rerr == nil || code != 0:
		t.Fatalf("after SIGKILL the client read a reply %d %s (err %v); want a broken connection", code, msg, rerr)
	case errors.As(rerr, &ne) && ne.Timeout():
		t.Fatalf("after SIGKILL the client's connection is still open (read timed out)")
	}
	t.Logf("client after SIGKILL: write error %v, read error %v", werr, rerr)

	h.restart()
	// The unacknowledged file is not a message: quarantined (kept for a
	// human, and logged) or gone, never loaded.
	if _, err := os.Stat(filepath.Join(h.spool, partial+".msg")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s.msg still live after the restart: %v", partial, err)
	}
	brokenPath := filepath.Join(h.spool, partial+".msg.broken")
	_, berr := os.Stat(brokenPath)
	quarantined := berr == nil
	if quarantined {
		if !dpLogHas(h, "quarantining", partial) {
			t.Errorf("%s was quarantined without a log line naming it", brokenPath)
		}
		if v := h.metric("relaycar_spool_broken_total"); v != 1 {
			t.Errorf("relaycar_spool_broken_total = %v, want 1 (the interrupted intake)", v)
		}
		t.Logf("interrupted intake kept as %s", filepath.Base(brokenPath))
	} else if !errors.Is(berr, fs.ErrNotExist) {
		t.Fatal(berr)
	}
	if q := h.api("/api/queue"); dpHasID(q, partial) {
		t.Errorf("/api/queue lists the unacknowledged %s after the restart", partial)
	}

	sink.Restart()
	waitFor(t, 30*time.Second, "the 4 acknowledged messages at the sink", func() bool { return sink.Count() >= len(acked) })
	h.waitSpoolEmpty(30 * time.Second)

	got := map[int]int{}
	for _, s := range seqs(t, sink) {
		got[s]++
	}
	for seq, id := range acked {
		if got[seq] != 1 {
			t.Errorf("acknowledged message %d (%s) delivered %d times, want 1", seq, id, got[seq])
		}
	}
	if got[bigSeq] != 0 {
		t.Errorf("the interrupted, never acknowledged message reached the sink %d times", got[bigSeq])
	}
	for _, m := range sink.Messages() {
		if len(m.Data) > 1<<20 {
			t.Errorf("the sink got a %d-byte message; only small ones were acknowledged", len(m.Data))
		}
	}
	if n := sink.Count(); n != len(acked) {
		t.Errorf("sink got %d messages, want %d", n, len(acked))
	}
	if q := h.api("/api/queue"); len(q) != 0 {
		t.Errorf("/api/queue after delivery = %+v, want empty", q)
	}
	if d := h.api("/api/dead"); len(d) != 0 {
		t.Errorf("/api/dead = %+v, want empty (the interrupted message is no dead letter)", d)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters on disk: %v", ids)
	}
	if tmp := h.tmpFiles(); len(tmp) != 0 {
		t.Errorf("temp files left: %v", tmp)
	}
	if quarantined {
		if _, err := os.Stat(brokenPath); err != nil {
			t.Errorf("the quarantined file went away: %v (it is kept for a human)", err)
		}
	}
}

// A disk that fills up in the middle of a message's DATA: the client
// hears 451 4.3.0 at the end of DATA, nothing of the message is kept,
// /readyz is 503 while the disk is full and 200 again as soon as the
// partial file is gone, and the next message goes through.
func TestDataPath_ENOSPCMidStream(t *testing.T) {
	small := testwait.Tmpfs(t, "4m")
	sink := testsmtp.Start(t, testsmtp.Options{})
	spoolDir := filepath.Join(small, "spool")
	h := newHarness(t, fmt.Sprintf(`
spool: {dir: %s}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, spoolDir, sink.Addr))

	body := dpFiller(6_000_000, 2, false)
	// Short of the 4 MiB volume: Writable's want on a volume this small is
	// a tenth of it (about 410 KiB), so this leaves too little to be ready.
	firstPart := (4_000_000 / dpLineLen) * dpLineLen
	r := dpOpenData(h)
	r.write(dpHeader(1, "larger than the spool volume"))
	dpWrite(t, r.c, body[:firstPart])
	var readyBody []byte
	waitFor(t, 20*time.Second, "/readyz 503 while a message fills the spool volume", func() bool {
		var code int
		code, readyBody = h.get("/readyz")
		return code == 503
	})
	t.Logf("/readyz while the volume fills: 503 %s", bytes.TrimSpace(readyBody))
	if !bytes.Contains(readyBody, []byte("full")) {
		t.Errorf("/readyz 503 body %q does not say the spool is full", readyBody)
	}

	// The rest of the message does not fit: the spool write fails on the
	// way, the relay reads the DATA to its end and answers 451.
	dpWrite(t, r.c, body[firstPart:])
	r.write(".\r\n")
	reply := r.expect(451)
	if !strings.HasPrefix(reply, "4.3.0 ") {
		t.Errorf("reply to DATA on a full disk: 451 %s, want 451 4.3.0", reply)
	}
	if strings.Contains(reply, small) {
		t.Errorf("451 reply leaks the spool path: %s", reply)
	}
	r.cmd(221, "QUIT")

	// Nothing of it is kept: no .msg, no .broken, no temp file.
	for _, dir := range []string{spoolDir, filepath.Join(spoolDir, "dead")} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if n := e.Name(); n != ".lock" && !(e.IsDir() && n == "dead") {
				t.Errorf("left in %s after the failed write: %s", dir, n)
			}
		}
	}
	// The partial file's space was freed before the reply, which is what
	// Writable waits for after a failed write: ready at once.
	if code, b := h.get("/readyz"); code != 200 {
		t.Errorf("/readyz right after the 451 = %d %s, want 200 (the partial file's space is free again)", code, bytes.TrimSpace(b))
	}
	if !h.logContains("no space left on device") {
		t.Errorf("no log line says the spool write failed for lack of space")
	}
	if v := h.metric("relaycar_smtp_refused_total", "code=451"); v != 1 {
		t.Errorf(`relaycar_smtp_refused_total{code="451"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_messages_received_total"); v != 0 {
		t.Errorf("relaycar_messages_received_total = %v, want 0", v)
	}

	// And the next message is accepted and delivered.
	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 2, "after the full disk"))
	waitFor(t, 15*time.Second, "delivery of the message after the full disk", func() bool { return sink.Count() >= 1 })
	h.waitSpoolEmpty(15 * time.Second)
	if got := seqs(t, sink); !slices.Equal(got, []int{2}) {
		t.Errorf("sink got seqs %v, want [2] (%s) only", got, id)
	}
	if code, _ := h.get("/readyz"); code != 200 {
		t.Errorf("/readyz at the end = %d, want 200", code)
	}
}

// dpV1Entry is one message of the v1 fixture.
type dpV1Entry struct {
	env  *spool.Envelope
	eml  []byte
	dead bool
}

// nextAttemptRE is the next_attempt field of a v1 .json.
var nextAttemptRE = regexp.MustCompile(`"next_attempt": "[^"]*"`)

// dpCopyV1 copies the v1 fixture to dir with the modes v1 wrote (0600
// files, 0700 directories) and returns its entries by id. The fixture was
// made with a 1h retry, so its next_attempt times are an hour after its
// making: each live entry's next_attempt is set back to its received_at,
// so that it is due whenever the test runs. Nothing else changes.
func dpCopyV1(t *testing.T, from, to string) map[string]*dpV1Entry {
	t.Helper()
	out := map[string]*dpV1Entry{}
	entry := func(id string) *dpV1Entry {
		if out[id] == nil {
			out[id] = &dpV1Entry{}
		}
		return out[id]
	}
	err := filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		dst := filepath.Join(to, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		name := d.Name()
		id := strings.TrimSuffix(name, filepath.Ext(name))
		dead := filepath.Base(filepath.Dir(path)) == "dead"
		switch filepath.Ext(name) {
		case ".json":
			var env spool.Envelope
			if err := json.Unmarshal(b, &env); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if !dead {
				at := env.ReceivedAt.Format(time.RFC3339Nano)
				if n := len(nextAttemptRE.FindAll(b, -1)); n != 1 {
					return fmt.Errorf("%s: %d next_attempt fields", path, n)
				}
				b = nextAttemptRE.ReplaceAll(b, []byte(`"next_attempt": "`+at+`"`))
			}
			e := entry(id)
			e.env, e.dead = &env, dead
		case ".eml":
			entry(id).eml = b
		}
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			return err
		}
		return os.Chmod(dst, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// The upgrade: the new binary started on a spool the previous release
// left delivers every pending recipient exactly once with the original
// Message-ID and bytes, sends nothing again to those already delivered,
// keeps the dead letter dead until an operator retries it, and leaves no
// v1 file behind.
func TestDataPath_V1SpoolDeliveredByNewBinary(t *testing.T) {
	t.Parallel()
	spoolDir := filepath.Join(t.TempDir(), "spool")
	v1 := dpCopyV1(t, filepath.Join(repoRoot, "relay", "spool", "testdata", "v1"), spoolDir)

	// The fixture is what tools/make-spool-fixture.sh says (four live
	// messages, one recipient pending in each, one dead letter), checked
	// so that the assertions below cannot pass on a changed fixture.
	type want struct {
		id      string
		pending []string // what must be delivered, once
		done    []string // delivered by v1: never again
		eml     []byte
	}
	byName := map[string]*want{}
	var deadID string
	var deadEML []byte
	for id, e := range v1 {
		if e.env == nil || e.eml == nil {
			t.Fatalf("fixture entry %s lacks its .json or .eml", id)
		}
		name := strings.TrimSuffix(strings.TrimPrefix(e.env.MessageID, "<fixture-"), "@example.com>")
		if e.dead {
			if name != "dead" || deadID != "" {
				t.Fatalf("unexpected dead letter %s (%s) in the fixture", id, e.env.MessageID)
			}
			deadID, deadEML = id, e.eml
			continue
		}
		w := &want{id: id, eml: e.eml}
		for _, rs := range e.env.Routes {
			w.pending = append(w.pending, rs.Pending...)
		}
		for _, d := range e.env.Deliveries {
			w.done = append(w.done, d.Rcpts...)
		}
		byName[name] = w
	}
	for name, pend := range map[string][]string{
		"queued-1": {"ok@example.net"},
		"queued-2": {"ok@example.net"},
		"partial":  {"later@example.net"},
		"split":    {"later@partner.example"},
	} {
		if w := byName[name]; w == nil || !slices.Equal(w.pending, pend) {
			t.Fatalf("fixture message %s: %+v, want pending %v", name, w, pend)
		}
	}
	if len(byName) != 4 || deadID == "" || !slices.Equal(byName["partial"].done, []string{"ok@example.net"}) ||
		!slices.Equal(byName["split"].done, []string{"ok@example.net"}) {
		t.Fatalf("fixture is not the one described in tools/make-spool-fixture.sh: %d live, dead %q", len(byName), deadID)
	}

	sink := testsmtp.Start(t, testsmtp.Options{}) // accepts everything, reject@ too
	h := newHarness(t, fmt.Sprintf(`
listen: {hostname: relaycar.fixture}
spool: {dir: %s}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: partners, match: {recipient_domains: [partner.example]}, upstreams: [sink]}
  - {name: default, upstreams: [sink]}
`, spoolDir, sink.Addr))

	waitFor(t, 30*time.Second, "the 4 pending v1 messages at the sink", func() bool { return sink.Count() >= 4 })
	h.waitSpoolEmpty(30 * time.Second)

	byMsgID := map[string][]testsmtp.Msg{}
	for _, m := range sink.Messages() {
		mid := header(t, m.Data, "Message-ID")
		byMsgID[mid] = append(byMsgID[mid], m)
	}
	for name, w := range byName {
		mid := v1[w.id].env.MessageID
		got := byMsgID[mid]
		if len(got) != 1 {
			t.Errorf("%s (%s): delivered %d times, want once", name, mid, len(got))
			continue
		}
		m := got[0]
		if !slices.Equal(m.To, w.pending) {
			t.Errorf("%s: delivered to %v, want only the pending %v (already delivered by v1: %v)", name, m.To, w.pending, w.done)
		}
		if m.From != "app@example.com" {
			t.Errorf("%s: envelope sender %q", name, m.From)
		}
		if !bytes.Equal(m.Data, w.eml) {
			t.Errorf("%s: delivered bytes differ from the v1 .eml:\n%s\nwant:\n%s", name, m.Data, w.eml)
		}
	}
	if n := sink.Count(); n != 4 {
		t.Errorf("sink got %d messages, want 4", n)
	}
	if got := byMsgID["<fixture-dead@example.com>"]; len(got) != 0 {
		t.Errorf("the dead letter was delivered before any retry: %v", got)
	}

	// The dead letter stays dead, with its reason.
	dead := h.api("/api/dead")
	if len(dead) != 1 || dead[0].ID != deadID || !strings.Contains(dead[0].DeadReason, "550 5.1.1") {
		t.Errorf("/api/dead = %+v, want %s with its 550 5.1.1 reason", dead, deadID)
	}
	if ids := h.deadIDs(); !slices.Equal(ids, []string{deadID}) {
		t.Errorf("dead/ holds %v, want [%s] as a .msg", ids, deadID)
	}
	if fi, err := os.Stat(filepath.Join(spoolDir, "dead", deadID+".msg")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("migrated dead letter: %v, %v; want mode 0600", fi, err)
	}
	if v := h.metric("relaycar_dead_letter_messages"); v != 1 {
		t.Errorf("relaycar_dead_letter_messages = %v, want 1", v)
	}
	if v := h.metric("relaycar_spool_broken_total"); v != 0 {
		t.Errorf("relaycar_spool_broken_total = %v, want 0: nothing in the fixture is damaged", v)
	}
	// No v1 file is left, live or dead, and nothing else either.
	for _, dir := range []string{spoolDir, filepath.Join(spoolDir, "dead")} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			n := e.Name()
			switch {
			case strings.HasSuffix(n, ".eml"), strings.HasSuffix(n, ".json"):
				t.Errorf("v1 file left: %s", filepath.Join(dir, n))
			case n == ".lock", n == "dead" && e.IsDir(), dir != spoolDir && n == deadID+".msg":
			case dir == spoolDir && strings.HasPrefix(n, ".free-"): // delivered files kept for reuse
			default:
				t.Errorf("unexpected file in the spool after delivery: %s", filepath.Join(dir, n))
			}
		}
	}

	// An operator retries the dead letter through the CLI, beside the
	// running relay: it is delivered once, and the spool ends empty.
	code, out := runCLI(t, h.dir, nil, "queue", "retry", deadID, "--config", "relay.yaml")
	if code != 0 || !strings.Contains(out, deadID) {
		t.Fatalf("relaycar queue retry %s: exit %d, output %q", deadID, code, out)
	}
	waitFor(t, 15*time.Second, "the retried dead letter at the sink", func() bool { return sink.Count() >= 5 })
	h.waitSpoolEmpty(15 * time.Second)
	waitFor(t, 5*time.Second, "dead/ to be empty", func() bool { return len(h.deadIDs()) == 0 })
	var retried []testsmtp.Msg
	for _, m := range sink.Messages() {
		if header(t, m.Data, "Message-ID") == "<fixture-dead@example.com>" {
			retried = append(retried, m)
		}
	}
	if len(retried) != 1 || !slices.Equal(retried[0].To, []string{"reject@example.net"}) || !bytes.Equal(retried[0].Data, deadEML) {
		t.Errorf("retried dead letter at the sink: %+v, want once to [reject@example.net] with the v1 bytes", retried)
	}
	if n := sink.Count(); n != 5 {
		t.Errorf("sink got %d messages in all, want 5", n)
	}
	if d := h.api("/api/dead"); len(d) != 0 {
		t.Errorf("/api/dead after the retry = %+v, want empty", d)
	}
	if v := h.metric("relaycar_dead_letter_messages"); v != 0 {
		t.Errorf("relaycar_dead_letter_messages after the retry = %v, want 0", v)
	}
}

// dpStripTrace removes the Received field the relay prepends (with its
// continuation lines), failing unless the message starts with one.
func dpStripTrace(t *testing.T, data []byte) []byte {
	t.Helper()
	if !bytes.HasPrefix(data, []byte("Received: ")) {
		n := min(len(data), 200)
		t.Fatalf("delivered message does not start with the relay's Received header:\n%s", data[:n])
	}
	i := 0
	for {
		j := bytes.Index(data[i:], []byte("\r\n"))
		if j < 0 {
			t.Fatalf("delivered message has no line end")
		}
		i += j + 2
		if i >= len(data) || (data[i] != ' ' && data[i] != '\t') {
			return data[i:]
		}
	}
}

// A large message streams through to an smtp upstream byte for byte,
// while the intake's memory reservation stays a small fraction of it and
// is given back afterwards.
func TestDataPath_LargeMessageStreamsThrough(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	h := newHarness(t, fmt.Sprintf(`
listen: {max_message_bytes: 41943040}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr))

	orig := append([]byte(dpHeader(1, "large, streamed")), dpFiller(24_000_000, 4, true)...)
	sum := sha256.Sum256(orig)

	conn, err := net.DialTimeout("tcp", h.smtp, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = 30*time.Second, 2*time.Minute
	defer c.Close()
	if err := c.Hello("tests.local"); err != nil {
		t.Fatal(err)
	}
	if err := c.Mail(sender, &smtp.MailOptions{Size: int64(len(orig))}); err != nil {
		t.Fatalf("MAIL with SIZE=%d: %v", len(orig), err)
	}
	if err := c.Rcpt(recipient, nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	half := len(orig) / 2
	if _, err := w.Write(orig[:half]); err != nil {
		t.Fatal(err)
	}
	// Mid-DATA: the intake holds its fixed reservation, not the message.
	var inUse float64
	waitFor(t, 10*time.Second, "the intake's memory reservation", func() bool {
		inUse = h.metric("relaycar_memory_budget_in_use_bytes")
		return inUse > 0
	})
	if inUse >= 4<<20 {
		t.Errorf("relaycar_memory_budget_in_use_bytes = %v during a 24 MB DATA; intake must not reserve the message's size", inUse)
	}
	t.Logf("memory budget in use during DATA: %v bytes", inUse)
	if _, err := w.Write(orig[half:]); err != nil {
		t.Fatal(err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		t.Fatalf("end of DATA: %v", err)
	}
	c.Quit()
	_, id, _ := strings.Cut(resp.StatusText, "queued as ")
	id = strings.TrimSpace(id)

	waitFor(t, 60*time.Second, "the large message at the sink", func() bool { return sink.Count() >= 1 })
	h.waitSpoolEmpty(30 * time.Second)
	msgs := sink.Messages()
	if len(msgs) != 1 {
		t.Fatalf("sink got %d messages, want 1", len(msgs))
	}
	got := msgs[0].Data
	if id == "" || !bytes.Contains(got[:min(len(got), 512)], []byte("id "+id+";")) {
		t.Errorf("the Received header does not name spool id %q", id)
	}
	rest := dpStripTrace(t, got)
	if gotSum := sha256.Sum256(rest); gotSum != sum {
		t.Errorf("delivered message minus the Received header: %d bytes sha256 %x; sent %d bytes sha256 %x",
			len(rest), gotSum, len(orig), sum)
		// Say where, for the log.
		for i := range min(len(rest), len(orig)) {
			if rest[i] != orig[i] {
				t.Logf("first difference at byte %d: got %q, sent %q", i, rest[i:min(i+80, len(rest))], orig[i:min(i+80, len(orig))])
				break
			}
		}
	}
	if hdrEnd := bytes.Index(got, []byte("\r\n\r\n")); hdrEnd < 0 || bytes.Count(got[:hdrEnd], []byte("\r\nReceived: "))+1 != 1 {
		t.Errorf("want exactly one Received header in the delivered header section")
	}

	waitFor(t, 10*time.Second, "relaycar_memory_budget_in_use_bytes back at 0", func() bool {
		return h.metric("relaycar_memory_budget_in_use_bytes") == 0
	})
	if v := h.metric("relaycar_memory_budget_bytes"); v <= 0 {
		t.Errorf("relaycar_memory_budget_bytes = %v, want > 0", v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=sink", "result=delivered"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="sink",result="delivered"} = %v, want 1`, v)
	}
}
