package tests

import (
	"syscall"
	"testing"
	"time"
)

// SIGHUP (what systemd's ExecReload and many operators send) reloads and
// must never end the relay: Go's default for it is to exit without a drain
// or a log line. SIGUSR1/2 are logged and ignored.
func TestSIGHUPDoesNotKill(t *testing.T) {
	t.Parallel()
	outbox := t.TempDir()
	h := newHarness(t, `
upstreams:
  - {name: outbox, type: file, dir: `+outbox+`}
routes:
  - {name: default, upstreams: [outbox]}
`)
	p := h.current()
	for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2} {
		if err := p.cmd.Process.Signal(sig); err != nil {
			t.Fatalf("signal %v: %v", sig, err)
		}
	}
	waitFor(t, 5*time.Second, "the ignored-signal log line", func() bool { return h.logContains("signal ignored") })
	waitFor(t, 5*time.Second, "SIGHUP's reload", func() bool { return h.logContains("config reloaded") })
	select {
	case <-p.done:
		t.Fatalf("relaycar exited after SIGHUP: %v", p.state)
	case <-time.After(300 * time.Millisecond):
	}
	id := h.mustSend("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", 1, "after SIGHUP"))
	waitFor(t, 10*time.Second, "delivery after SIGHUP", func() bool { return len(h.spoolIDs()) == 0 })
	if code, _ := h.get("/healthz"); code != 200 {
		t.Fatalf("/healthz after SIGHUP = %d", code)
	}
	t.Logf("message %s delivered after SIGHUP", id)
}
