package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

const (
	sender    = "app@example.com"
	recipient = "user@example.net"
)

// twoUpstreams is a failover route a -> b over two SMTP sinks; extraA is
// spliced into upstream a's entry (e.g. a circuit_breaker).
func twoUpstreams(a, b *testsmtp.Server, extraA, extraB string) string {
	return fmt.Sprintf(`
upstreams:
  - {name: a, type: smtp, address: %q, tls: none%s}
  - {name: b, type: smtp, address: %q, tls: none%s}
routes:
  - {name: default, upstreams: [a, b], strategy: failover}
`, a.Addr, extraA, b.Addr, extraB)
}

// seqs returns the X-Test-Seq of every message a sink received.
func seqs(t *testing.T, s *testsmtp.Server) []int {
	t.Helper()
	var out []int
	for _, m := range s.Messages() {
		n, err := strconv.Atoi(header(t, m.Data, "X-Test-Seq"))
		if err != nil {
			t.Fatalf("sink message without X-Test-Seq:\n%s", m.Data)
		}
		out = append(out, n)
	}
	return out
}

// assertFailoverToB checks the common outcome of the failover tests.
func assertFailoverToB(t *testing.T, h *harness, a, b *testsmtp.Server, id string) {
	t.Helper()
	waitFor(t, 10*time.Second, "delivery at sink b", func() bool { return b.Count() >= 1 })
	h.waitSpoolEmpty(10 * time.Second)
	if n := a.Count(); n != 0 {
		t.Errorf("sink a received %d messages, want 0", n)
	}
	if got := seqs(t, b); !slices.Equal(got, []int{1}) {
		t.Errorf("sink b received seqs %v, want exactly [1]", got)
	}
	m := b.Messages()[0]
	if m.From != sender || !slices.Equal(m.To, []string{recipient}) {
		t.Errorf("sink b envelope = %s -> %v, want %s -> [%s]", m.From, m.To, sender, recipient)
	}
	if !strings.Contains(string(m.Data), "id "+id) {
		t.Errorf("delivered message has no Received header naming spool id %s:\n%s", id, m.Data)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters on disk: %v", ids)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=a", "result=transient"); v < 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="a",result="transient"} = %v, want >= 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=b", "result=delivered"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="b",result="delivered"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=a", "result=delivered"); v != 0 {
		t.Errorf(`relaycar_deliveries_total{upstream="a",result="delivered"} = %v, want 0`, v)
	}
	if v := h.metric("relaycar_messages_received_total"); v != 1 {
		t.Errorf("relaycar_messages_received_total = %v, want 1", v)
	}
}

func TestFailover_FirstUpstream421(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.SetScript(testsmtp.Script{Mail: func(string) error { return testsmtp.Reply(421, "4.3.2", "service not available, try later") }})
	h := newHarness(t, twoUpstreams(a, b, "", ""))

	msg := "X-Relay-Note: steer me\r\n" + message(sender, recipient, 1, "failover 421")
	id := h.mustSend(sender, []string{recipient}, msg)
	assertFailoverToB(t, h, a, b, id)
	if a.Conns() < 1 {
		t.Errorf("sink a saw no connection: the relay never tried the first upstream")
	}
	// The bytes b got: X-Relay-* removed, Message-ID kept, one Received added.
	got := string(b.Messages()[0].Data)
	if strings.Contains(strings.ToLower(got), "x-relay-") {
		t.Errorf("X-Relay-* header reached the upstream:\n%s", got)
	}
	if want := header(t, []byte(msg), "Message-ID"); header(t, []byte(got), "Message-ID") != want {
		t.Errorf("Message-ID changed: got %q, want %q", header(t, []byte(got), "Message-ID"), want)
	}
	if n := strings.Count(got, "Received: "); n != 1 {
		t.Errorf("%d Received headers, want 1", n)
	}
	if _, body, _ := strings.Cut(msg, "\r\n\r\n"); !strings.HasSuffix(got, "\r\n\r\n"+body) {
		t.Errorf("body changed in transit:\n%s", got)
	}
}

func TestFailover_FirstUpstream421AtData(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.SetScript(testsmtp.Script{Data: func(testsmtp.Msg) error { return testsmtp.Reply(421, "4.3.2", "shutting down") }})
	h := newHarness(t, twoUpstreams(a, b, "", ""))

	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "failover 421 at DATA"))
	assertFailoverToB(t, h, a, b, id)
}

func TestFailover_FirstUpstreamDown(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.Stop()
	h := newHarness(t, twoUpstreams(a, b, "", ""))

	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "failover down"))
	assertFailoverToB(t, h, a, b, id)
}

func TestDeadLetter_550AtDataNoFailover(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.SetScript(testsmtp.Script{Data: func(testsmtp.Msg) error {
		return testsmtp.Reply(550, "5.7.1", "message refused by content policy")
	}})
	h := newHarness(t, twoUpstreams(a, b, "", ""))

	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "dead letter"))
	waitFor(t, 10*time.Second, "the dead letter on disk", func() bool { return slices.Contains(h.deadIDs(), id) })
	h.waitSpoolEmpty(5 * time.Second)

	// The dead letter: its state with the reason, and the body with it.
	dead := deadEnvelope(t, h.spool, id)
	if !strings.Contains(dead.DeadReason, "550") {
		t.Errorf("dead_reason %q does not mention the 550", dead.DeadReason)
	}
	if len(dead.Failures) != 1 || dead.Failures[0].Upstream != "a" || dead.Failures[0].Class != "rejected" {
		t.Errorf("failures = %+v, want one rejected by a", dead.Failures)
	}
	if _, err := os.Stat(filepath.Join(h.spool, "dead", id+".msg")); err != nil {
		t.Errorf("dead letter file: %v", err)
	}
	if ids := h.deadIDs(); !slices.Equal(ids, []string{id}) {
		t.Errorf("dead letters on disk = %v, want [%s]", ids, id)
	}
	if d := h.api("/api/dead"); len(d) != 1 || d[0].ID != id || !strings.Contains(d[0].DeadReason, "550") {
		t.Errorf("/api/dead = %+v, want %s with a 550 reason", d, id)
	}

	// No failover: b saw nothing at all, a accepted nothing.
	if n := b.Conns(); n != 0 {
		t.Errorf("sink b saw %d connections: a 5xx at DATA must not fail over", n)
	}
	if n := a.Count() + b.Count(); n != 0 {
		t.Errorf("sinks recorded %d messages, want 0", n)
	}
	if v := h.metric("relaycar_dead_letter_messages"); v != 1 {
		t.Errorf("relaycar_dead_letter_messages = %v, want 1", v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=a", "result=rejected"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="a",result="rejected"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=b"); v != 0 {
		t.Errorf(`relaycar_deliveries_total{upstream="b"} = %v, want 0`, v)
	}

	// Still dead after a few retry periods: nothing retries a dead letter.
	time.Sleep(600 * time.Millisecond)
	if n := a.Conns(); n != 1 {
		t.Errorf("sink a saw %d connections, want exactly 1 attempt", n)
	}

	// An operator fixes the cause and requeues the dead letter through the
	// CLI, which goes through the admin API while the relay serves.
	a.SetScript(testsmtp.Script{})
	code, out := runCLI(t, h.dir, nil, "queue", "dead", "--config", h.cfgPath)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "550") {
		t.Errorf("relaycar queue dead: exit %d, want 0 and %s with its 550 reason:\n%s", code, id, out)
	}
	if code, out := runCLI(t, h.dir, nil, "queue", "retry", id, "--config", h.cfgPath); code != 0 {
		t.Fatalf("relaycar queue retry %s: exit %d\n%s", id, code, out)
	}
	waitFor(t, 10*time.Second, "the requeued dead letter at sink a", func() bool { return a.Count() == 1 })
	h.waitSpoolEmpty(5 * time.Second)
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters after the retry: %v", ids)
	}
	if v := h.metric("relaycar_dead_letter_messages"); v != 0 {
		t.Errorf("relaycar_dead_letter_messages = %v after the retry, want 0", v)
	}
	if n := b.Count(); n != 0 {
		t.Errorf("sink b received %d messages, want 0", n)
	}
}

func TestRetry_AllUpstreamsDownThenRecover(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.Stop()
	b.Stop()
	// Breakers that never open keep this test about the retry schedule.
	cb := ", circuit_breaker: {failures: 1000, open_for: 1s}"
	h := newHarness(t, twoUpstreams(a, b, cb, cb))

	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "all down"))

	attempts := func() int {
		for _, e := range h.api("/api/queue") {
			if e.ID == id {
				return e.Attempts
			}
		}
		t.Fatalf("message %s is not in /api/queue", id)
		return 0
	}
	var first int
	waitFor(t, 10*time.Second, "a first failed attempt", func() bool { first = attempts(); return first >= 1 })
	waitFor(t, 10*time.Second, "the attempts to grow", func() bool { return attempts() > first })
	q := h.api("/api/queue")
	if len(q) != 1 || q[0].LastError == "" {
		t.Errorf("/api/queue = %+v, want the message with a last_error", q)
	}
	if _, err := os.Stat(filepath.Join(h.spool, id+".msg")); err != nil {
		t.Errorf("spooled message: %v", err)
	}
	if v := h.metric("relaycar_spool_messages"); v != 1 {
		t.Errorf("relaycar_spool_messages = %v, want 1", v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=a", "result=transient"); v < 2 {
		t.Errorf(`relaycar_deliveries_total{upstream="a",result="transient"} = %v, want >= 2`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=b", "result=transient"); v < 2 {
		t.Errorf(`relaycar_deliveries_total{upstream="b",result="transient"} = %v, want >= 2`, v)
	}

	a.Restart()
	b.Restart()
	waitFor(t, 10*time.Second, "delivery after the upstreams came back", func() bool { return a.Count()+b.Count() >= 1 })
	h.waitSpoolEmpty(5 * time.Second)
	// Give a duplicate the chance to show up.
	time.Sleep(500 * time.Millisecond)
	if n := a.Count() + b.Count(); n != 1 {
		t.Errorf("sinks received %d copies, want exactly 1", n)
	}
	if n := a.Count(); n != 1 {
		t.Errorf("sink a (primary) received %d, want 1: failover order is a, b", n)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters: %v", ids)
	}
	if v := h.metric("relaycar_deliveries_total", "result=delivered"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{result="delivered"} = %v, want 1`, v)
	}
}

func TestCrash_Kill9DuringAcceptAndDelivery(t *testing.T) {
	t.Parallel()
	const (
		total   = 200
		senders = 8
		// The sink takes the first passBeforeKill messages and answers 451
		// to every later one until after the kill, so deliveries are in
		// progress during the load but at most passBeforeKill of the
		// total/2 (or more) acknowledged messages can have left the spool
		// when the kill comes: the kill always interrupts something.
		passBeforeKill = 20
	)
	sink := testsmtp.Start(t, testsmtp.Options{})
	var sinkTook atomic.Int32
	sink.SetScript(testsmtp.Script{DataDelay: 20 * time.Millisecond, Data: func(testsmtp.Msg) error {
		if sinkTook.Add(1) > passBeforeKill {
			return testsmtp.Reply(451, "4.3.0", "busy until after the kill")
		}
		return nil
	}})
	h := newHarness(t, fmt.Sprintf(`
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr))

	var (
		mu        sync.Mutex
		acked     = map[int]string{} // seq -> spool id
		earlyErrs []error
		next      atomic.Int32
		killing   atomic.Bool
		half      = make(chan struct{})
		halfOnce  sync.Once
		wg        sync.WaitGroup
	)
	for range senders {
		wg.Go(func() {
			for {
				seq := int(next.Add(1))
				if seq > total {
					return
				}
				id, err := h.send(sender, []string{recipient}, message(sender, recipient, seq, "crash test"))
				mu.Lock()
				switch {
				case err == nil:
					acked[seq] = id
					if len(acked) >= total/2 {
						halfOnce.Do(func() { close(half) })
					}
				case !killing.Load():
					earlyErrs = append(earlyErrs, fmt.Errorf("seq %d: %w", seq, err))
				}
				mu.Unlock()
				if err != nil && killing.Load() {
					return // the relay is gone; the rest are never acknowledged
				}
			}
		})
	}
	select {
	case <-half:
	case <-time.After(30 * time.Second):
		killing.Store(true)
		wg.Wait()
		t.Fatalf("only %d of %d messages acknowledged within 30s; errors: %v", len(acked), total, earlyErrs)
	}
	killing.Store(true)
	h.kill9()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(earlyErrs) > 0 {
		t.Errorf("sends failed before the kill: %v", earlyErrs)
	}
	atKill := sink.Count()
	left := h.spoolIDs()
	t.Logf("at SIGKILL: %d acknowledged, %d at the sink, %d left in the spool, %d .tmp files",
		len(acked), atKill, len(left), len(h.tmpFiles()))
	inSpool := map[string]bool{}
	for _, id := range left {
		inSpool[id] = true
	}
	ackedInSpool := 0
	for _, id := range acked {
		if inSpool[id] {
			ackedInSpool++
		}
	}
	if ackedInSpool == 0 {
		t.Errorf("no acknowledged message was in the spool at SIGKILL (%d acknowledged, %d at the sink): the kill interrupted nothing",
			len(acked), atKill)
	}
	// Delivered files went back to the pool and later messages were
	// committed over them, under the pool files' names: the restart must
	// find those by their contents.
	placed := h.placedIDs()
	t.Logf("at SIGKILL: %d queued messages in pool files", len(placed))
	if len(placed) == 0 {
		t.Errorf("no queued message was in a pool file at SIGKILL: the test no longer covers messages committed in place")
	}

	// The upstream comes back only now, after the kill.
	sink.SetScript(testsmtp.Script{DataDelay: 20 * time.Millisecond})
	h.restart()
	h.waitSpoolEmpty(30 * time.Second)
	if tmp := h.tmpFiles(); len(tmp) != 0 {
		t.Errorf("temp files left after recovery: %v", tmp)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters after recovery: %v", ids)
	}

	got := map[int]int{}
	for _, s := range seqs(t, sink) {
		got[s]++
	}
	var missing []int
	dups := 0
	for seq := range acked {
		switch n := got[seq]; {
		case n == 0:
			missing = append(missing, seq)
		case n > 1:
			dups += n - 1
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Errorf("%d acknowledged messages never reached the sink: seqs %v", len(missing), missing)
	}
	unacked := 0
	for seq := range got {
		if _, ok := acked[seq]; !ok {
			unacked++
		}
	}
	t.Logf("after restart: %d acknowledged, %d distinct at the sink (%d accepted without the client seeing the 250), %d duplicates (allowed: at-least-once)",
		len(acked), len(got), unacked, dups)
}

func TestBreaker_OpensThenRecovers(t *testing.T) {
	t.Parallel()
	a := testsmtp.Start(t, testsmtp.Options{})
	b := testsmtp.Start(t, testsmtp.Options{})
	a.SetScript(testsmtp.Script{Mail: func(string) error { return testsmtp.Reply(421, "4.3.2", "overloaded") }})
	h := newHarness(t, twoUpstreams(a, b, ", circuit_breaker: {failures: 2, open_for: 2s}", ""))

	deliver := func(seq int, to *testsmtp.Server, want int) {
		t.Helper()
		h.mustSend(sender, []string{recipient}, message(sender, recipient, seq, "breaker"))
		waitFor(t, 10*time.Second, fmt.Sprintf("message %d to be delivered", seq), func() bool { return to.Count() >= want })
		h.waitSpoolEmpty(5 * time.Second)
	}
	// Two transient failures at a open its breaker, at some moment after
	// opening (taken before the second message).
	deliver(1, b, 1)
	opening := time.Now()
	deliver(2, b, 2)
	if n := a.Conns(); n != 2 {
		t.Fatalf("sink a saw %d connections after 2 messages, want 2", n)
	}
	if v := h.metric("relaycar_upstream_breaker_state", "upstream=a"); v != 2 {
		t.Fatalf(`relaycar_upstream_breaker_state{upstream="a"} = %v after 2 failures, want 2 (open)`, v)
	}
	// While open, traffic goes straight to b: a sees no new connection.
	for seq := 3; seq <= 5; seq++ {
		deliver(seq, b, seq)
	}
	if time.Since(opening) >= 2*time.Second {
		t.Fatalf("test too slow: open_for (2s) elapsed before the open-breaker phase was checked")
	}
	if n := a.Conns(); n != 2 {
		t.Errorf("sink a saw %d connections while its breaker was open, want still 2", n)
	}
	if v := h.metric("relaycar_upstream_skipped_total", "upstream=a", "reason=breaker_open"); v < 3 {
		t.Errorf(`relaycar_upstream_skipped_total{upstream="a",reason="breaker_open"} = %v, want >= 3`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=a", "result=transient"); v != 2 {
		t.Errorf(`relaycar_deliveries_total{upstream="a",result="transient"} = %v, want 2`, v)
	}

	// a recovers; after open_for the breaker half-opens and the next
	// message goes to the primary again, which closes it.
	a.SetScript(testsmtp.Script{})
	waitFor(t, 5*time.Second, "breaker a to half-open after open_for", func() bool {
		return h.metric("relaycar_upstream_breaker_state", "upstream=a") == 1
	})
	if d := time.Since(opening); d < 2*time.Second {
		t.Errorf("breaker half-opened after %s, before open_for (2s)", d)
	}
	deliver(6, a, 1)
	if got := seqs(t, a); !slices.Equal(got, []int{6}) {
		t.Errorf("sink a received seqs %v, want [6]", got)
	}
	if got := seqs(t, b); !slices.Equal(got, []int{1, 2, 3, 4, 5}) {
		t.Errorf("sink b received seqs %v, want [1 2 3 4 5]", got)
	}
	if v := h.metric("relaycar_upstream_breaker_state", "upstream=a"); v != 0 {
		t.Errorf(`relaycar_upstream_breaker_state{upstream="a"} = %v after a successful probe, want 0 (closed)`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=b", "result=delivered"); v != 5 {
		t.Errorf(`relaycar_deliveries_total{upstream="b",result="delivered"} = %v, want 5`, v)
	}
}

func TestRateLimit_PerSecond5(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	var arrivals []time.Time // guarded by the sink's lock (Script funcs run under it)
	sink.SetScript(testsmtp.Script{Data: func(testsmtp.Msg) error {
		arrivals = append(arrivals, time.Now())
		return nil
	}})
	h := newHarness(t, fmt.Sprintf(`
upstreams:
  - name: only
    type: smtp
    address: %q
    tls: none
    rate_limit: {per_second: 5, burst: 5, max_wait: 200ms}
routes:
  - {name: default, upstreams: [only]}
`, sink.Addr))

	const total = 30
	var wg sync.WaitGroup
	errs := make(chan error, total)
	for w := range 5 {
		wg.Go(func() {
			for seq := w + 1; seq <= total; seq += 5 {
				if _, err := h.send(sender, []string{recipient}, message(sender, recipient, seq, "rate")); err != nil {
					errs <- fmt.Errorf("seq %d: %w", seq, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("send: %v", err)
	}
	waitFor(t, 20*time.Second, "all 30 messages at the sink", func() bool { return sink.Count() >= total })
	h.waitSpoolEmpty(5 * time.Second)

	got := seqs(t, sink)
	slices.Sort(got)
	got = slices.Compact(got)
	if len(got) != total || got[0] != 1 || got[total-1] != total {
		t.Errorf("sink has %d distinct messages (%d in all), want %d: %v", len(got), sink.Count(), total, got)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters: %v", ids)
	}
	// 5 tokens of burst then one per 200ms: the limiter admits the 30th
	// message at least 5s after the first. Arrival at the sink adds each
	// SMTP transaction's own duration (dial to end of DATA, a few ms that
	// vary under load), hence the small tolerance.
	sink.SetScript(testsmtp.Script{}) // no more writes to arrivals
	span := arrivals[len(arrivals)-1].Sub(arrivals[0])
	t.Logf("30 deliveries spanned %s", span.Round(time.Millisecond))
	if span < 5*time.Second-100*time.Millisecond {
		t.Errorf("deliveries spanned %s, want >= 5s at 5/s with burst 5", span)
	}
	if v := h.metric("relaycar_upstream_rate_limited_total", "upstream=only"); v <= 0 {
		t.Errorf(`relaycar_upstream_rate_limited_total{upstream="only"} = %v, want > 0`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=only", "result=delivered"); v != total {
		t.Errorf(`relaycar_deliveries_total{upstream="only",result="delivered"} = %v, want %d`, v, total)
	}
}

func TestShutdown_SigtermDuringSlowDelivery(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{DataDelay: 3 * time.Second})
	h := newHarness(t, fmt.Sprintf(`
shutdown_grace: 10s
upstreams:
  - {name: slow, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [slow]}
`, sink.Addr))

	id := h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "slow"))
	waitFor(t, 5*time.Second, "the delivery to start", func() bool { return sink.Conns() >= 1 })
	time.Sleep(200 * time.Millisecond) // let it reach DATA and the sink's delay

	// Watch /readyz during the drain.
	var saw503 atomic.Bool
	stopWatch := make(chan struct{})
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		deadline := time.After(15 * time.Second)
		for {
			if code, _ := h.get("/readyz"); code == 503 {
				saw503.Store(true)
				return
			}
			select {
			case <-stopWatch:
				return
			case <-deadline:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	code, took := h.sigterm()
	close(stopWatch)
	<-watchDone
	t.Logf("relaycar exited %d after %s; /readyz 503 observed during drain: %v", code, took.Round(time.Millisecond), saw503.Load())
	if code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	// The delivery in flight ends ~2.8s after the signal (the sink's 3s
	// delay); stopping must follow it, not sit out the 10s grace.
	if took > h.grace/2 {
		t.Errorf("took %s to stop with only an idle client, want well under shutdown_grace (%s)", took, h.grace)
	}

	delivered := sink.Count() == 1
	_, errMsg := os.Stat(filepath.Join(h.spool, id+".msg"))
	spooled := errMsg == nil
	switch {
	case delivered && spooled:
		t.Logf("delivered and still spooled: will be sent again at the next start (at-least-once)")
	case delivered:
		t.Logf("delivered during the drain")
	case spooled:
		t.Logf("left in the spool for the next start")
	default:
		t.Errorf("message %s lost: not at the sink (count %d) and not in the spool (%v)", id, sink.Count(), errMsg)
	}
	if tmp := h.tmpFiles(); len(tmp) != 0 {
		t.Errorf("temp files left in the spool: %v", tmp)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters: %v", ids)
	}
}

func TestShutdown_IdleClientDoesNotBlockExit(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	h := newHarness(t, fmt.Sprintf(`
shutdown_grace: 10s
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr))

	// A client that connected and then went quiet (a pooled connection):
	// with no transaction in flight the relay closes it at once instead of
	// waiting out the grace period.
	c := h.dialRaw()
	c.expect(220)
	c.cmd(250, "EHLO tests.local")
	code, took := h.sigterm()
	t.Logf("relaycar exited %d after %s with an idle client", code, took.Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	// The delivery in flight ends ~2.8s after the signal (the sink's 3s
	// delay); stopping must follow it, not sit out the 10s grace.
	if took > h.grace/2 {
		t.Errorf("took %s to stop with only an idle client, want well under shutdown_grace (%s)", took, h.grace)
	}
	if _, err := c.tp.ReadLine(); err == nil {
		// A 421 before closing is fine; the connection must end.
		if _, err := c.tp.ReadLine(); err == nil {
			t.Errorf("the idle client's connection is still open after the relay exited")
		}
	}
}
