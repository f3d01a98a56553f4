package policy

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/relaycar/relaycar/upstreams"
)

// syncBuf is a log sink safe for the prober goroutine.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) count(sub string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Count(s.b.String(), sub)
}

func newTestShared(t *testing.T, addr string, replicas int, log *syncBuf) *Shared {
	t.Helper()
	o := SharedOptions{Address: addr, KeyPrefix: "rc", Replicas: replicas, ProbeEvery: 50 * time.Millisecond}
	if log != nil {
		o.Logger = slog.New(slog.NewTextHandler(log, nil))
	}
	s := NewShared(o)
	t.Cleanup(func() { s.Close() })
	return s
}

// granted is the deadline of a Take that must succeed: time for a first
// dial to Redis under -race on a busy machine (10 ms was not always). A
// refusal keeps a short deadline, as it is decided at once.
const granted = time.Second

func takeWithin(l Limiter, n int, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return l.Take(ctx, n)
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Two replicas on one Redis draw from one bucket: what one took, the
// other cannot take again.
func TestSharedLimiter_TwoReplicasShareOneBucket(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	a := newTestShared(t, m.Addr(), 2, nil).Limiter("ses", 1, 4)
	b := newTestShared(t, m.Addr(), 2, nil).Limiter("ses", 1, 4)
	if !takeWithin(a, 3, granted) {
		t.Fatal("replica a: 3 of a burst of 4 refused")
	}
	if !takeWithin(b, 1, granted) {
		t.Fatal("replica b: the 4th token refused")
	}
	if takeWithin(a, 1, 10*time.Millisecond) || takeWithin(b, 1, 10*time.Millisecond) {
		t.Fatal("a 5th token within 10ms at 1/s with burst 4: the bucket is not shared")
	}
	if !m.Exists("rate:rc:rate:ses") {
		t.Errorf("GCRA key rate:rc:rate:ses missing; keys: %v", m.Keys())
	}
}

// A message with more recipients than the burst costs the burst, as with
// the local limiter; redis_rate would refuse it forever otherwise.
func TestSharedLimiter_CostAboveBurstIsClamped(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	l := newTestShared(t, m.Addr(), 1, nil).Limiter("ses", 1, 5)
	if !takeWithin(l, 50, granted) {
		t.Fatal("a 50-recipient message refused with burst 5")
	}
	if takeWithin(l, 1, 10*time.Millisecond) {
		t.Fatal("the clamped message took less than the whole burst")
	}
}

// max_wait: a token due within the deadline is waited for; one due after
// it is refused at once, without sleeping to the deadline.
func TestSharedLimiter_MaxWait(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	l := newTestShared(t, m.Addr(), 1, nil).Limiter("ses", 0.5, 1) // one token per 2s
	if !takeWithin(l, 1, granted) {
		t.Fatal("first token refused")
	}
	start := time.Now()
	if !takeWithin(l, 1, 5*time.Second) {
		t.Fatal("a token due in 2s refused with max_wait 5s")
	}
	if took := time.Since(start); took < time.Second {
		t.Errorf("waited only %s for a token due in about 2s", took)
	}
	// Due in 2s, max_wait 1s: a limiter that slept towards the deadline
	// would take the whole second; a refusal at once takes a round trip.
	start = time.Now()
	if takeWithin(l, 1, time.Second) {
		t.Fatal("a token due in 2s given with max_wait 1s")
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("a refusal took %s; it should not sleep towards a deadline it cannot meet", took)
	}
}

// SetRate (the provider's quota moved) changes the shared bucket. GCRA
// keeps time already owed, so the new rate applies from the next token.
func TestSharedLimiter_SetRate(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	l := newTestShared(t, m.Addr(), 1, nil).Limiter("ses", 50, 1) // 20ms per token
	for i := range 2 {
		if !takeWithin(l, 1, 100*time.Millisecond) {
			t.Fatalf("token %d refused at 50/s within 100ms", i)
		}
	}
	l.SetRate(1)
	takeWithin(l, 1, 100*time.Millisecond)
	if takeWithin(l, 1, 100*time.Millisecond) {
		t.Fatal("a token within 100ms after SetRate(1)")
	}
}

// Redis goes away mid-run (a failover, a restart): mail keeps its local
// share of the rate at once, the switch is logged once each way, and the
// shared limit returns when Redis answers again.
func TestShared_FallbackAndBack(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	var log syncBuf
	s := newTestShared(t, m.Addr(), 2, &log)
	l := s.Limiter("ses", 20, 4) // fallback: 10/s, burst 2
	if !s.Up() || !takeWithin(l, 1, granted) {
		t.Fatalf("up=%v before Redis stopped", s.Up())
	}

	m.Close()
	// The local fallback: a burst of 2, then 10/s; the shared token above
	// was charged to it too, so no fresh burst comes with the switch.
	got := 0
	for range 5 {
		start := time.Now()
		if takeWithin(l, 1, 10*time.Millisecond) {
			got++
		}
		// go-redis's own retries stall ~400 ms per call; the bound is
		// below that, not a speed claim.
		if took := time.Since(start); took > 250*time.Millisecond {
			t.Errorf("Take with Redis stopped took %s", took)
		}
	}
	if s.Up() {
		t.Error("Up() with Redis stopped")
	}
	if got != 1 {
		t.Errorf("fallback admitted %d of 5 at once, want 1 (a burst of 2, less the token taken through Redis)", got)
	}
	if !takeWithin(l, 1, 200*time.Millisecond) {
		t.Error("fallback gave no token within 200ms at 10/s")
	}
	if n := log.count("shared rate limit unavailable; using the local fallback"); n != 1 {
		t.Errorf("fallback logged %d times, want once:\n%s", n, log.b.String())
	}

	if err := m.Restart(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Second, "Up() after Redis restarted", s.Up)
	if !takeWithin(l, 1, granted) {
		t.Fatal("no shared token after Redis came back")
	}
	if !m.Exists("rate:rc:rate:ses") {
		t.Error("after Redis came back the limiter did not use it")
	}
	if n := log.count("shared rate limit available again"); n != 1 {
		t.Errorf("return logged %d times, want once", n)
	}
}

// A dead Redis must cost a worker milliseconds: go-redis's defaults
// stall about 400 ms per call (5 dial retries).
func TestShared_DeadRedisCostsMilliseconds(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now

	start := time.Now()
	s := newTestShared(t, addr, 1, nil)
	if took := time.Since(start); took > 250*time.Millisecond {
		t.Errorf("NewShared with Redis dead took %s (go-redis's retries stall ~400 ms)", took)
	}
	l := s.Limiter("ses", 1000, 1000)
	p := s.Pauses()
	for i := range 20 {
		start := time.Now()
		if !takeWithin(l, 1, time.Second) {
			t.Fatalf("Take %d refused with the fallback at 1000/s", i)
		}
		p.PausedUntil("ses")
		if took := time.Since(start); took > 250*time.Millisecond {
			t.Errorf("Take+PausedUntil %d with Redis dead took %s (go-redis's retries stall ~400 ms)", i, took)
		}
		time.Sleep(10 * time.Millisecond) // let the prober try meanwhile
	}
	if s.Up() {
		t.Error("Up() with nothing listening")
	}
}

// A throttle seen by one replica pauses the upstream for the others, and
// a shorter pause never cuts a longer one short.
func TestSharedPauses_SharedAndKeptLocally(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	a := newTestShared(t, m.Addr(), 2, nil).Pauses()
	b := newTestShared(t, m.Addr(), 2, nil).Pauses()
	if !b.PausedUntil("ses").IsZero() {
		t.Fatal("paused before any pause")
	}
	until := time.Now().Add(10 * time.Second).Truncate(time.Millisecond)
	a.Pause("ses", until)
	a.Pause("ses", time.Now().Add(time.Second)) // shorter: ignored
	waitUntil(t, time.Second, "replica b to see the pause", func() bool { return b.PausedUntil("ses").Equal(until) })
	if ttl := m.TTL("rc:pause:ses"); ttl <= 5*time.Second || ttl > 10*time.Second {
		t.Errorf("pause key TTL %s, want about 10s (it expires with the pause)", ttl)
	}
	m.Close()
	if got := a.PausedUntil("ses"); !got.Equal(until) {
		t.Errorf("replica a forgot its own pause with Redis down: %v", got)
	}
}

// Through a Gate: a message costs one token per recipient and a skip for
// lack of one is rate_limited, as with the local limit.
func TestShared_GateAdmitsPerRecipient(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	s := newTestShared(t, m.Addr(), 2, nil)
	// max_wait bounds the Redis call too: 10ms made a loaded machine's
	// slow reply a fallback to the local limit (burst 1), not a token.
	c := upstreams.Config{Name: "up", RateLimit: upstreams.RateLimit{PerSecond: 1, Burst: 3, MaxWait: 300 * time.Millisecond, Shared: true},
		CircuitBreaker: upstreams.CircuitBreaker{Failures: 5, OpenFor: time.Minute}}
	g := NewGate(&scripted{}, c, GateHooks{Limiter: s.Limiter("up", 1, 3), Pauses: s.Pauses()})
	if got := g.Admit(context.Background(), Ask{Rcpts: 3}); got != NotSkipped {
		t.Fatalf("3 recipients with burst 3: %v", got)
	}
	if got := g.Admit(context.Background(), Ask{Rcpts: 1}); got != SkipRateLimited {
		t.Fatalf("a 4th recipient within 300ms at 1/s: %v, want rate_limited", got)
	}
	s.Pauses().Pause("up", time.Now().Add(time.Minute)) // another replica's 429
	waitUntil(t, time.Second, "the gate to see a pause set through Redis", func() bool {
		return g.Admit(context.Background(), Ask{Rcpts: 1}) == SkipThrottled
	})
}

// A wrong password is a Redis that does not answer: the fallback, logged
// without the password.
func TestShared_WrongPasswordFallsBackWithoutLeaking(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	m.RequireAuth("right-password")
	var log syncBuf
	s := NewShared(SharedOptions{Address: m.Addr(), Password: "wrong-password-123", KeyPrefix: "rc", Replicas: 2,
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	t.Cleanup(func() { s.Close() })
	if s.Up() {
		t.Error("Up() with a wrong password")
	}
	if !takeWithin(s.Limiter("ses", 10, 10), 1, granted) {
		t.Error("the fallback refused the first token")
	}
	if log.count("using the local fallback") != 1 || log.count("wrong-password-123") != 0 {
		t.Errorf("log:\n%s", log.b.String())
	}
}
