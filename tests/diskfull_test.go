package tests

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/internal/testwait"
)

// Models the spool volume filling up while the only upstream is down: the
// relay must answer 451 (the client keeps the message), keep nothing half
// written, go on serving, and deliver everything it acknowledged once the
// upstream is back and space frees up.
func TestDiskFull_451NothingLostAndRecovers(t *testing.T) {
	small := testwait.Tmpfs(t, "600k")
	sink := testsmtp.Start(t, testsmtp.Options{})
	sinkAddr := sink.Addr
	sink.Stop() // upstream down: accepted mail piles up in the spool
	h := newHarness(t, fmt.Sprintf(`
spool: {dir: %s}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 5, open_for: 1s}}
routes:
  - {name: default, upstreams: [sink]}
`, filepath.Join(small, "spool"), sinkAddr))

	body := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 1600) // ~100 KB
	var accepted []string
	refused := false
	for i := 0; i < 20 && !refused; i++ {
		id, err := h.send("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", i, "fill")+body)
		switch {
		case err == nil:
			accepted = append(accepted, id)
		case smtpCode(err) == 451:
			refused = true
			var se *smtp.SMTPError
			if !errors.As(err, &se) || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 0}) || strings.Contains(se.Message, small) {
				t.Errorf("refusal = %v, want a generic 451 4.3.0", err)
			}
		default:
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if !refused || len(accepted) == 0 {
		t.Fatalf("accepted %d, refused %v: the 600k spool should fill after a few 100 KB messages", len(accepted), refused)
	}
	t.Logf("accepted %d messages, then 451", len(accepted))
	// Exactly the acknowledged messages are on disk, nothing half-written.
	if got := h.spoolIDs(); len(got) != len(accepted) {
		t.Errorf("spool holds %v, acknowledged %v", got, accepted)
	}
	if tmp := h.tmpFiles(); len(tmp) > 0 {
		t.Errorf("leftover temp files: %v", tmp)
	}
	// Still serving: a small message may or may not fit, but the reply is
	// clean and the process is alive.
	if code, _ := h.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while the disk is full", code)
	}
	if _, err := h.send("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", 99, "small")); err != nil && smtpCode(err) != 451 {
		t.Errorf("small message on a full disk: %v, want 250 or 451", err)
	}

	// The upstream comes back: everything acknowledged is delivered.
	sink.Restart()
	h.waitSpoolEmpty(30 * time.Second)
	got := map[string]bool{}
	for _, m := range sink.Messages() {
		got[header(t, m.Data, "X-Test-Seq")] = true
	}
	for i := range accepted {
		if !got[fmt.Sprint(i)] {
			t.Errorf("acknowledged message %d (%s) was not delivered", i, accepted[i])
		}
	}
	// And with space back, new mail is accepted again.
	h.mustSend("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", 100, "after")+body)
}

// spool.max_bytes (the chart sets an emptyDir's sizeLimit, past which the
// kubelet evicts the pod and its spool at once): the relay answers 452
// 4.3.1 at MAIL before its files reach the cap, /readyz turns 503, and
// everything it acknowledged is delivered once the upstream is back.
func TestSpoolMaxBytes_RefusesBeforeTheCapAndDelivers(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	sinkAddr := sink.Addr
	sink.Stop()
	h := newHarness(t, fmt.Sprintf(`
listen: {max_message_bytes: 200000}
spool: {max_bytes: 1Mi}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 5, open_for: 1s}}
routes:
  - {name: default, upstreams: [sink]}
`, sinkAddr))
	body := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 1600) // ~100 KB
	var accepted []string
	var last error
	for i := 0; i < 30; i++ {
		id, err := h.send("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", i, "fill")+body)
		if err != nil {
			last = err
			break
		}
		accepted = append(accepted, id)
	}
	var se *smtp.SMTPError
	if !errors.As(last, &se) || se.Code != 452 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) {
		t.Fatalf("after %d messages: %v, want 452 4.3.1", len(accepted), last)
	}
	if n := len(accepted); n < 5 || n > 9 {
		t.Errorf("refused after %d messages of 100 KB under 1 MiB, want 5-9 (the cap less 5 %% and the largest message)", n)
	}
	if used := duBytes(t, h.spool); used > 1<<20 {
		t.Errorf("the spool takes %d bytes, over spool.max_bytes", used)
	}
	if code, _ := h.get("/readyz"); code != 503 {
		t.Errorf("/readyz = %d with the spool at its cap, want 503", code)
	}
	if got := h.spoolIDs(); len(got) != len(accepted) {
		t.Errorf("spool holds %d messages, %d were acknowledged", len(got), len(accepted))
	}
	sink.Restart()
	h.waitSpoolEmpty(30 * time.Second)
	if sink.Count() != len(accepted) {
		t.Errorf("upstream got %d messages, want the %d acknowledged", sink.Count(), len(accepted))
	}
}

// duBytes is what the files under dir take on disk, as du counts.
func duBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			}
		}
		return nil
	})
	return n
}
