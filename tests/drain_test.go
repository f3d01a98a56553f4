package tests

import (
	"fmt"
	"net/mail"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

// downUpstream is an smtp sink standing for a provider that is down for
// everyone except the recipients in ok, so messages queue up in the relay
// and some are partly delivered.
func downUpstream(t *testing.T, ok func(rcpt string) bool) *testsmtp.Server {
	s := testsmtp.Start(t, testsmtp.Options{})
	s.SetScript(testsmtp.Script{Rcpt: func(to string) error {
		if ok(to) {
			return nil
		}
		return testsmtp.Reply(451, "4.3.0", "try again later")
	}})
	return s
}

// peerRelay is a healthy relaycar delivering to its own sink.
func peerRelay(t *testing.T) (*harness, *testsmtp.Server) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	h := newHarness(t, fmt.Sprintf(`
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr))
	return h, sink
}

// byRcpt counts the peer's deliveries per recipient and checks each
// delivered copy for the original Message-ID and no hop header.
func byRcpt(t *testing.T, msgs []testsmtp.Msg, msgIDs map[string]string) map[string]int {
	t.Helper()
	got := map[string]int{}
	for _, m := range msgs {
		pm, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
		if err != nil {
			t.Fatalf("peer delivered an unreadable message: %v", err)
		}
		if pm.Header.Get("X-Relaycar-Drained") != "" {
			t.Errorf("the hop header reached the provider:\n%s", m.Data)
		}
		for _, r := range m.To {
			got[r]++
			if want := msgIDs[r]; want != "" && pm.Header.Get("Message-Id") != want {
				t.Errorf("%s got Message-ID %q, want the original %q", r, pm.Header.Get("Message-Id"), want)
			}
		}
	}
	return got
}

// Relay A's upstream is down (but for some recipients: partly delivered
// messages); on SIGTERM, after its grace, A hands every pending recipient
// to relay B over SMTP and exits with an empty spool; B delivers each
// pending recipient exactly once, with the original Message-ID.
func TestDrain_ShutdownHandsPendingRecipientsToPeer(t *testing.T) {
	t.Parallel()
	peer, peerSink := peerRelay(t)
	var mu sync.Mutex
	upA := downUpstream(t, func(r string) bool { mu.Lock(); defer mu.Unlock(); return strings.HasPrefix(r, "early") })
	a := newHarness(t, fmt.Sprintf(`
shutdown_grace: 1s
shutdown: {drain_to: %q}
spool: {retry: {initial: 1h, max: 1h, multiplier: 2}}
upstreams:
  - {name: down, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 1000}}
routes:
  - {name: default, upstreams: [down]}
`, peer.smtp, upA.Addr))
	msgIDs := map[string]string{}
	var pending []string
	for i := range 15 {
		rcpts := []string{fmt.Sprintf("late%02d@example.net", i)}
		if i%3 == 0 { // partly delivered: early… goes out, late… waits
			rcpts = append([]string{fmt.Sprintf("early%02d@example.net", i)}, rcpts...)
		}
		data := message(sender, rcpts[0], i, "drain me")
		a.mustSend(sender, rcpts, data)
		msgIDs[rcpts[len(rcpts)-1]] = header(t, []byte(data), "Message-ID")
		pending = append(pending, rcpts[len(rcpts)-1])
	}
	waitFor(t, 15*time.Second, "every message tried once at A's upstream", func() bool {
		return a.metric("relaycar_deliveries_total", "upstream=down") >= 15
	})
	if n := upA.Count(); n != 5 {
		t.Fatalf("A's upstream took %d partial deliveries, want 5", n)
	}
	code, took := a.sigterm()
	if code != 0 {
		t.Errorf("A exited %d", code)
	}
	if took > 2*a.grace+3*time.Second {
		t.Errorf("A took %v to stop (grace %v, plus the drain)", took, a.grace)
	}
	if ids := a.spoolIDs(); len(ids) != 0 {
		t.Errorf("A's spool still holds %v after draining", ids)
	}
	waitFor(t, 15*time.Second, "B to deliver the drained recipients", func() bool { return len(peerSink.Messages()) >= 15 })
	time.Sleep(500 * time.Millisecond) // a duplicate would show up by now
	got := byRcpt(t, peerSink.Messages(), msgIDs)
	for _, r := range pending {
		if got[r] != 1 {
			t.Errorf("%s delivered %d times by the peer, want 1", r, got[r])
		}
	}
	for r, n := range got {
		if strings.HasPrefix(r, "early") {
			t.Errorf("%s was already delivered by A, yet the peer delivered it %d times", r, n)
		}
	}
	if !a.logContains("drained to peer") {
		t.Error(`no "drained to peer" log line`)
	}
}

// A message drained too often without a delivery attempt in between
// stays in the spool on shutdown instead of going round again (relays
// draining into each other); one this relay tried goes to the peer.
func TestDrain_HopLimitStopsLoops(t *testing.T) {
	t.Parallel()
	peer, peerSink := peerRelay(t)
	upA := downUpstream(t, func(string) bool { return false })
	a := newHarness(t, fmt.Sprintf(`
shutdown_grace: 1s
shutdown: {drain_to: %q}
upstreams:
  - {name: down, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 1, open_for: 10m}}
routes:
  - {name: default, upstreams: [down]}
`, peer.smtp, upA.Addr))
	// fresh is tried and opens the breaker, so looped, which arrives with
	// the hop limit reached, is never tried here.
	fresh := a.mustSend(sender, []string{"fresh@example.net"}, message(sender, "fresh@example.net", 2, "first hop"))
	waitFor(t, 10*time.Second, "the fresh message tried", func() bool {
		return a.metric("relaycar_deliveries_total", "upstream=down") >= 1
	})
	looped := "X-Relaycar-Drained: 3\r\n" + message(sender, "loop@example.net", 1, "looping")
	a.mustSend(sender, []string{"loop@example.net"}, looped)
	waitFor(t, 10*time.Second, "the looping message skipped", func() bool {
		return a.metric("relaycar_upstream_skipped_total", "upstream=down") >= 1
	})
	// A SIGHUP during the shutdown (an operator's reload racing a
	// rollout) must not end the process before its drain.
	p := a.current()
	p.stopping = true
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the shutdown to begin", func() bool { return a.logContains(`msg="shutting down"`) })
	p.cmd.Process.Signal(syscall.SIGHUP)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("A did not stop")
	}
	if code := p.state.ExitCode(); code != 0 || !a.logContains("drained to peer") {
		t.Fatalf("A exited %d (%v) without finishing its drain", code, p.state)
	}
	if ids := a.spoolIDs(); len(ids) != 1 || ids[0] == fresh {
		t.Errorf("A's spool holds %v, want only the looping message", ids)
	}
	if !a.logContains("drained too often") {
		t.Error("no log line about the hop limit")
	}
	waitFor(t, 10*time.Second, "the fresh message at the peer", func() bool { return peerSink.Count() >= 1 })
	time.Sleep(300 * time.Millisecond)
	if got := peerSink.Messages(); len(got) != 1 || !slices.Equal(got[0].To, []string{"fresh@example.net"}) {
		t.Errorf("peer delivered %+v, want only the fresh message", got)
	}
}

// `relaycar drain` on the spool of a killed relay: refused while a relay
// holds it, drains everything once, and a rerun finds nothing to do.
func TestDrain_CommandOnAKilledRelaysSpool(t *testing.T) {
	t.Parallel()
	peer, peerSink := peerRelay(t)
	upA := downUpstream(t, func(string) bool { return false })
	a := newHarness(t, fmt.Sprintf(`
upstreams:
  - {name: down, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 1000}}
routes:
  - {name: default, upstreams: [down]}
`, upA.Addr))
	msgIDs := map[string]string{}
	for i := range 6 {
		r := fmt.Sprintf("orphan%d@example.net", i)
		data := message(sender, r, i, "orphaned")
		a.mustSend(sender, []string{r}, data)
		msgIDs[r] = header(t, []byte(data), "Message-ID")
	}
	code, out := runCLI(t, a.dir, nil, "drain", "--spool", a.spool, "--to", peer.smtp)
	if code != 2 || !strings.Contains(out, "in use by a running relay") {
		t.Fatalf("drain of a live relay's spool: exit %d, %q; want 2 and a refusal", code, out)
	}
	if peerSink.Count() != 0 {
		t.Fatal("the refused drain sent mail")
	}
	a.kill9()
	code, out = runCLI(t, a.dir, nil, "drain", "--spool", a.spool, "--to", peer.smtp)
	if code != 0 || !strings.Contains(out, "drained 6 messages (6 recipients)") || !strings.Contains(out, "0 left") {
		t.Fatalf("drain: exit %d, %q", code, out)
	}
	code, out = runCLI(t, a.dir, nil, "drain", "--spool", a.spool, "--to", peer.smtp)
	if code != 0 || !strings.Contains(out, "drained 0 messages") {
		t.Fatalf("second drain: exit %d, %q", code, out)
	}
	waitFor(t, 15*time.Second, "the peer to deliver the orphans", func() bool { return peerSink.Count() >= 6 })
	time.Sleep(300 * time.Millisecond)
	for r, n := range byRcpt(t, peerSink.Messages(), msgIDs) {
		if n != 1 {
			t.Errorf("%s delivered %d times, want 1", r, n)
		}
	}
	if ids := a.spoolIDs(); len(ids) != 0 {
		t.Errorf("spool after drain: %v", ids)
	}
	code, out = runCLI(t, a.dir, nil, "drain", "--spool", a.spool, "--to", "127.0.0.1:1")
	if code != 0 || !strings.Contains(out, "drained 0 messages") {
		t.Errorf("drain of an empty spool to a dead peer: exit %d, %q (nothing to do is success)", code, out)
	}
}

// A drained message keeps the route it was accepted for: the header that
// chose it (here a staging route that redirects everything to QA) was
// removed at intake, and routing afresh at the peer would mail the real
// recipient.
func TestDrain_KeepsTheMessagesRoute(t *testing.T) {
	t.Parallel()
	cfg := func(addr string) string {
		return fmt.Sprintf(`
upstreams:
  - {name: up, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 1000}}
routes:
  - {name: staging, match: {headers: {X-Relay-Env: staging}}, upstreams: [up], redirect_all_to: [qa@example.net]}
  - {name: default, upstreams: [up]}
`, addr)
	}
	peerSink := testsmtp.Start(t, testsmtp.Options{})
	peer := newHarness(t, cfg(peerSink.Addr))
	down := downUpstream(t, func(string) bool { return false })
	a := newHarness(t, "shutdown_grace: 1s\nshutdown: {drain_to: "+peer.smtp+"}\n"+cfg(down.Addr))
	a.mustSend(sender, []string{"customer@example.net"}, "X-Relay-Env: staging\r\n"+message(sender, "customer@example.net", 1, "staging only"))
	waitFor(t, 10*time.Second, "A to try", func() bool { return a.metric("relaycar_deliveries_total", "upstream=up") >= 1 })
	a.sigterm()
	waitFor(t, 10*time.Second, "the peer to deliver", func() bool { return peerSink.Count() >= 1 })
	time.Sleep(300 * time.Millisecond)
	got := peerSink.Messages()
	if len(got) != 1 || len(got[0].To) != 1 || got[0].To[0] != "qa@example.net" {
		t.Fatalf("peer delivered %+v; want only qa@example.net (the staging route's redirect)", got)
	}
}
