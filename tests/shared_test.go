package tests

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

// redisServer is a real redis-server this test started, on a loopback port.
type redisServer struct {
	t    *testing.T
	bin  string
	addr string
	cmd  *exec.Cmd
	done chan struct{}
}

// startRedis runs redis-server on addr without persistence. The shared
// limit claim is shown with the real server, not a fake.
func startRedis(t *testing.T, addr string) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal("redis-server is not installed: run scripts/test-deps.sh (as root it installs the Debian package redis-server)")
	}
	r := &redisServer{t: t, bin: bin, addr: addr}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *redisServer) start() {
	r.t.Helper()
	_, port, _ := net.SplitHostPort(r.addr)
	r.cmd = exec.Command(r.bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	r.cmd.Dir = r.t.TempDir()
	var out strings.Builder
	r.cmd.Stdout, r.cmd.Stderr = &out, &out
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("redis-server: %v", err)
	}
	r.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(r.cmd, r.done)
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", r.addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-r.done:
			r.t.Fatalf("redis-server exited at start: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			r.cmd.Process.Kill()
			r.t.Fatalf("redis-server did not listen on %s within 5s: %s", r.addr, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends this server by its PID and waits for it (idempotent).
func (r *redisServer) stop() {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
	}
	r.cmd = nil
}

// sendSplit sends n one-recipient messages, alternating between the
// relays, numbered from first; it returns when every one has its 250.
func sendSplit(t *testing.T, relays []*harness, first, n int) {
	t.Helper()
	var wg sync.WaitGroup
	for i, h := range relays {
		wg.Go(func() {
			for seq := first + i; seq < first+n; seq += len(relays) {
				h.mustSend(sender, []string{recipient}, message(sender, recipient, seq, "shared limit"))
			}
		})
	}
	wg.Wait()
}

// waitSink waits until the sink holds want messages and returns when the
// last one came, failing after timeout.
func waitSink(t *testing.T, sink *testsmtp.Server, want int, timeout time.Duration) time.Time {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("%d messages at the sink", want), func() bool { return sink.Count() >= want })
	return time.Now()
}

// Two replicas of the chart share one provider quota: with
// rate_limit.shared the fleet sends at the account's rate, not twice it.
// Redis going away (a restart, a failover) never stops mail: each
// replica falls back to per_second / replicas, and the shared limit comes
// back with Redis.
func TestShared_TwoRelaysShareOneLimitThroughRealRedis(t *testing.T) {
	t.Parallel()
	redis := startRedis(t, freeAddr(t))
	sink := testsmtp.Start(t, testsmtp.Options{})
	cfg := fmt.Sprintf(`
redis: {address: %q, replicas: 2, key_prefix: it-%d}
spool: {workers: 4}
upstreams:
  - name: sink
    type: smtp
    address: %q
    tls: none
    rate_limit: {per_second: 10, burst: 10, max_wait: 5s, shared: true}
routes:
  - {name: default, upstreams: [sink]}
`, redis.addr, time.Now().UnixNano(), sink.Addr)
	relays := []*harness{newHarness(t, cfg), newHarness(t, cfg)}
	for i, h := range relays {
		if v := h.metric("relaycar_rate_limit_shared_up"); v != 1 {
			t.Fatalf("relay %d: relaycar_rate_limit_shared_up = %v with Redis up, want 1", i, v)
		}
	}

	// 60 messages at 10/s with a burst of 10: about 5 s for the fleet.
	// Two separate limits would take about 2 s (20 at once, then 20/s).
	start := time.Now()
	sendSplit(t, relays, 0, 60)
	took := waitSink(t, sink, 60, 30*time.Second).Sub(start)
	t.Logf("shared: 60 messages through two relays in %s", took)
	if min := (60-10)*time.Second/10 - 700*time.Millisecond; took < min {
		t.Errorf("60 messages in %s with a shared 10/s (burst 10): want at least %s", took, min)
	}
	if took > 15*time.Second {
		t.Errorf("60 messages took %s at a shared 10/s: the limit stalls", took)
	}

	// Redis stops while both relays run.
	redis.stop()
	for i, h := range relays {
		waitFor(t, 5*time.Second, fmt.Sprintf("relay %d: shared_up 0", i), func() bool { return h.metric("relaycar_rate_limit_shared_up") == 0 })
	}
	// Each relay alone: 5/s, burst 5; 20 each take about 3 s, not 0.
	start = time.Now()
	sendSplit(t, relays, 100, 40)
	took = waitSink(t, sink, 100, 30*time.Second).Sub(start)
	t.Logf("fallback: 40 messages through two relays in %s", took)
	if min := (20-5)*time.Second/5 - 700*time.Millisecond; took < min {
		t.Errorf("40 messages in %s on the fallback (5/s, burst 5 per relay): want at least %s", took, min)
	}
	if took > 12*time.Second {
		t.Errorf("40 messages took %s on the fallback: mail waits for the dead Redis", took)
	}
	for i, h := range relays {
		if !h.logContains("shared rate limit unavailable; using the local fallback") {
			t.Errorf("relay %d did not log the fallback", i)
		}
	}

	// Redis comes back on the same port: the shared limit returns.
	redis.start()
	for i, h := range relays {
		waitFor(t, 5*time.Second, fmt.Sprintf("relay %d: shared_up 1", i), func() bool { return h.metric("relaycar_rate_limit_shared_up") == 1 })
	}
	sendSplit(t, relays, 200, 10)
	waitSink(t, sink, 110, 30*time.Second)

	// None lost, none twice, nothing left behind.
	seen := map[string]int{}
	for _, m := range sink.Messages() {
		seen[header(t, m.Data, "X-Test-Seq")]++
	}
	for _, r := range [][2]int{{0, 60}, {100, 140}, {200, 210}} {
		for seq := r[0]; seq < r[1]; seq++ {
			if n := seen[fmt.Sprint(seq)]; n != 1 {
				t.Errorf("message %d reached the sink %d times", seq, n)
			}
		}
	}
	for i, h := range relays {
		h.waitSpoolEmpty(5 * time.Second)
		if n := len(h.deadIDs()); n != 0 {
			t.Errorf("relay %d dead-lettered %d messages", i, n)
		}
		if n := h.metric("relaycar_upstream_rate_limited_total", "upstream=sink"); n != 0 {
			t.Logf("relay %d: %v rate-limit skips (retried from the spool)", i, n)
		}
	}
}
