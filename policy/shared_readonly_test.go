package policy

import (
	"context"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/relaycar/relaycar/upstreams"
)

// startReadOnlyRedis runs a real redis-server on a free loopback port as
// the replica of a master that does not exist (port 1): it answers PING
// and GET but refuses every write with READONLY, as a replica left behind
// by a failover does. It is stopped by its PID at the test's end.
func startReadOnlyRedis(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not installed (scripts/test-deps.sh installs it); the WRONGTYPE test covers the probe with miniredis")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", "1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Dir = t.TempDir()
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("redis-server: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return addr
		}
		select {
		case <-done:
			t.Fatalf("redis-server exited at start: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not listen on %s within 5s: %s", addr, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A read-only replica (after a failover) answers PING and the pause GET
// but refuses the rate-limit script: the shared limit stays down, logged
// once, with mail on the fallback, instead of flapping with each probe.
// It comes back once the replica is promoted and takes writes.
func TestShared_ReadOnlyReplicaStaysDown(t *testing.T) {
	t.Parallel()
	addr := startReadOnlyRedis(t)
	var log syncBuf
	s := newTestShared(t, addr, 2, &log) // probes every 50 ms
	c := upstreams.Config{Name: "up", RateLimit: upstreams.RateLimit{PerSecond: 1000, Burst: 1000, MaxWait: time.Second, Shared: true},
		CircuitBreaker: upstreams.CircuitBreaker{Failures: 5, OpenFor: time.Minute}}
	g := NewGate(&scripted{}, c, GateHooks{Limiter: s.Limiter("up", 1000, 1000), Pauses: s.Pauses()})
	staysDown(t, s, &log, "read-only Redis", func() {
		if got := g.Admit(context.Background(), Ask{Rcpts: 1}); got != NotSkipped {
			t.Fatalf("Admit on the fallback: %v", got)
		}
	})

	rdb := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true})
	defer rdb.Close()
	if err := rdb.Do(context.Background(), "REPLICAOF", "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Second, "Up() after the replica was promoted", s.Up)
	if n := log.count("shared rate limit available again"); n != 1 {
		t.Errorf("return logged %d times, want once", n)
	}
}

// A limiter's key holding another type fails every Take there with
// WRONGTYPE while PING and writes elsewhere succeed: the probe tries that
// key too, so the limit stays on the fallback until the key is fixed.
func TestShared_WrongTypeKeyStaysDown(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	var log syncBuf
	s := newTestShared(t, m.Addr(), 2, &log)
	l := s.Limiter("ses", 1000, 1000)
	m.Lpush("rate:rc:rate:ses", "not a bucket")
	staysDown(t, s, &log, "WRONGTYPE key", func() {
		if !takeWithin(l, 1, granted) {
			t.Fatal("the fallback refused a token at 500/s")
		}
	})
	m.Del("rate:rc:rate:ses")
	waitUntil(t, 2*time.Second, "Up() after the key was removed", s.Up)
	if !takeWithin(l, 1, granted) || !m.Exists("rate:rc:rate:ses") {
		t.Error("the limiter did not go back to Redis")
	}
}

// staysDown calls use 50 times over a second (20 probes' worth) and
// fails unless the shared limit stayed down throughout, logged its fall
// once and never its return.
func staysDown(t *testing.T, s *Shared, log *syncBuf, what string, use func()) {
	t.Helper()
	ups := 0
	for range 50 {
		use()
		if s.Up() {
			ups++
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ups > 0 || log.count("available again") > 0 || log.count("unavailable") != 1 {
		t.Errorf("%s: up on %d of 50 samples; 'available again' x%d, 'unavailable' x%d, want 0, 0, 1:\n%s",
			what, ups, log.count("available again"), log.count("unavailable"), log.b.String())
	}
}
