package membudget

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// waitQueued waits until n requests are queued, so a test can order its
// goroutines without sleeping for a guessed time.
func waitQueued(t *testing.T, b *Budget, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		got := b.waiters.Len()
		b.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("queued = %d, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestAcquireConcurrentNeverExceedsLimit(t *testing.T) {
	const limit = 100
	b := New(limit)
	var held, high atomic.Int64
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for g := range 64 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 200 {
				n := 1 + r.Int64N(limit+20) // some clamped
				var release func()
				var err error
				got := min(n, limit) // what the budget grants after clamping
				if r.IntN(4) == 0 {
					var ok bool
					if release, ok = b.TryAcquire(n); !ok {
						continue
					}
				} else {
					got = min(n, limit-limit/TryShare)
					if release, err = b.Acquire(ctx, n); err != nil {
						t.Error(err)
						return
					}
				}
				now := held.Add(got)
				for {
					h := high.Load()
					if now <= h || high.CompareAndSwap(h, now) {
						break
					}
				}
				if now > limit {
					t.Errorf("held %d > limit %d", now, limit)
				}
				if got := b.InUse(); got > limit {
					t.Errorf("InUse %d > limit", got)
				}
				// Hold a moment, so others find the budget taken and wait
				// whatever the scheduler does (without -race a goroutine
				// can otherwise run its whole loop alone).
				time.Sleep(20 * time.Microsecond)
				held.Add(-got)
				release()
				release() // idempotent
			}
		})
	}
	wg.Wait()
	if b.InUse() != 0 {
		t.Fatalf("InUse after all released = %d", b.InUse())
	}
	if high.Load() > limit || high.Load() == 0 {
		t.Fatalf("high-water mark %d, want in (0, %d]", high.Load(), limit)
	}
	if b.Waits() == 0 {
		t.Fatal("no request ever waited; the test did not contend")
	}
	t.Logf("high-water %d/%d, waits %d", high.Load(), limit, b.Waits())
}

func TestAcquireCancelWhileWaiting(t *testing.T) {
	b := New(10)
	hold, _ := b.Acquire(context.Background(), 8)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := b.Acquire(ctx, 5)
		errc <- err
	}()
	waitQueued(t, b, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if got := b.InUse(); got != 8 {
		t.Fatalf("InUse after cancel = %d, want 8 (nothing reserved)", got)
	}
	waitQueued(t, b, 0)
	hold()
	if got := b.InUse(); got != 0 {
		t.Fatalf("InUse = %d, want 0", got)
	}
	// The whole budget is free again: nothing leaked.
	if r, ok := b.TryAcquire(10); !ok {
		t.Fatal("budget leaked: full TryAcquire failed")
	} else {
		r()
	}
	if b.Waits() != 1 {
		t.Fatalf("Waits = %d, want 1", b.Waits())
	}
}

func TestAcquireCanceledHeadWakesOthers(t *testing.T) {
	b := New(10)
	hold, _ := b.Acquire(context.Background(), 4)
	ctx, cancel := context.WithCancel(context.Background())
	headErr := make(chan error, 1)
	go func() { _, err := b.Acquire(ctx, 10); headErr <- err }() // needs everything
	waitQueued(t, b, 1)
	got := make(chan func(), 1)
	go func() { r, _ := b.Acquire(context.Background(), 3); got <- r }() // fits, but queued behind the head
	waitQueued(t, b, 2)
	select {
	case <-got:
		t.Fatal("small request overtook the queued head")
	case <-time.After(20 * time.Millisecond):
	}
	cancel()
	<-headErr
	select {
	case r := <-got:
		r()
	case <-time.After(5 * time.Second):
		t.Fatal("waiter behind a canceled head was not woken")
	}
	hold()
}

func TestAcquireAlreadyCanceled(t *testing.T) {
	b := New(10)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Acquire(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	if b.InUse() != 0 || b.Waits() != 0 {
		t.Fatalf("InUse %d Waits %d", b.InUse(), b.Waits())
	}
}

func TestAcquireFIFO(t *testing.T) {
	b := New(100)
	hold, _ := b.Acquire(context.Background(), 50)
	type req struct {
		granted chan struct{}
		release chan struct{}
	}
	start := func(n int64) req {
		r := req{make(chan struct{}), make(chan struct{})}
		go func() {
			rel, err := b.Acquire(context.Background(), n)
			if err != nil {
				t.Error(err)
				return
			}
			close(r.granted)
			<-r.release
			rel()
		}()
		return r
	}
	isGranted := func(r req) bool {
		select {
		case <-r.granted:
			return true
		case <-time.After(20 * time.Millisecond):
			return false
		}
	}
	a := start(60) // does not fit beside the 50 held
	waitQueued(t, b, 1)
	bb := start(10) // fits, but must not overtake a
	waitQueued(t, b, 2)
	c := start(40)
	waitQueued(t, b, 3)
	if isGranted(bb) {
		t.Fatal("a small request overtook the queued big one")
	}
	// Intake may overtake queued deliveries, within a quarter of the
	// budget, so a backlog of big deliveries does not stop all mail.
	if r, ok := b.TryAcquire(1); !ok {
		t.Fatal("TryAcquire refused while deliveries wait and the bytes are free")
	} else {
		r()
	}
	if _, ok := b.TryAcquire(b.Limit()/TryShare + 1); ok {
		t.Fatal("TryAcquire overtook queued waiters beyond its share")
	}
	hold() // 0 held: a (60) and b (70) are granted in order, c (110) is not
	if !isGranted(a) || !isGranted(bb) {
		t.Fatal("a and b not granted after the hold was released")
	}
	if isGranted(c) {
		t.Fatal("c granted past the limit")
	}
	close(bb.release) // 60 held: c fits now
	if !isGranted(c) {
		t.Fatal("c not granted after b released")
	}
	close(a.release)
	close(c.release)
	waitFor(t, func() bool { return b.InUse() == 0 })
}

// waitFor polls cond for up to 5s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestBigRequestNotStarved(t *testing.T) {
	b := New(10)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				r, err := b.Acquire(ctx, 3)
				if err != nil {
					return
				}
				time.Sleep(100 * time.Microsecond)
				r()
			}
		})
	}
	time.Sleep(5 * time.Millisecond)
	r, err := b.Acquire(ctx, 10)
	close(stop)
	if err != nil {
		t.Fatalf("big request starved: %v", err)
	}
	r()
	wg.Wait()
}

func TestClamp(t *testing.T) {
	b := New(10)
	r, err := b.Acquire(context.Background(), 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	// Clamped to what deliveries may hold, so intake's quarter stays free
	// beside it: the big request can never be starved by intake.
	if b.InUse() != 8 {
		t.Fatalf("InUse = %d, want clamped 8 (10 less the intake share)", b.InUse())
	}
	if _, err := b.Acquire(ctxTimeout(t, 20*time.Millisecond), 1<<40); err == nil {
		t.Fatal("a second clamped delivery got memory beside the first")
	}
	ri, ok := b.TryAcquire(2)
	if !ok {
		t.Fatal("intake refused its share beside a clamped delivery")
	}
	ri()
	r()
	// Oversized TryAcquire is clamped the same way: it succeeds when the
	// budget is entirely free.
	r2, ok := b.TryAcquire(11)
	if !ok || b.InUse() != 10 {
		t.Fatalf("TryAcquire(11) ok=%v InUse=%d", ok, b.InUse())
	}
	r2()
	if b.InUse() != 0 {
		t.Fatalf("InUse = %d", b.InUse())
	}
}

func TestZeroAndNil(t *testing.T) {
	b := New(1)
	r, err := b.Acquire(context.Background(), 0)
	if err != nil || b.InUse() != 0 {
		t.Fatalf("Acquire(0): %v, InUse %d", err, b.InUse())
	}
	r()
	var nb *Budget
	r, err = nb.Acquire(context.Background(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	r()
	if r, ok := nb.TryAcquire(1 << 30); !ok {
		t.Fatal("nil budget refused")
	} else {
		r()
	}
	if nb.Limit() != 0 || nb.InUse() != 0 || nb.Waits() != 0 {
		t.Fatal("nil budget reports usage")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("New(0) did not panic")
		}
	}()
	New(0)
}

func TestCollectors(t *testing.T) {
	b := New(1000)
	reg := prometheus.NewRegistry()
	reg.MustRegister(b.Collectors()...)
	r, _ := b.Acquire(context.Background(), 400)
	ctx, cancel := context.WithCancel(context.Background())
	go b.Acquire(ctx, 700)
	waitQueued(t, b, 1)
	cancel()
	waitQueued(t, b, 0)
	if mfs, err := reg.Gather(); err != nil || len(mfs) != 3 {
		t.Fatalf("gathered %d families, err %v", len(mfs), err)
	}
	for name, want := range map[string]float64{
		"relaycar_memory_budget_bytes":        1000,
		"relaycar_memory_budget_in_use_bytes": 400,
		"relaycar_memory_budget_waits_total":  1,
	} {
		mfs, _ := reg.Gather()
		var got float64 = -1
		for _, mf := range mfs {
			if mf.GetName() == name {
				m := mf.GetMetric()[0]
				if g := m.GetGauge(); g != nil {
					got = g.GetValue()
				} else {
					got = m.GetCounter().GetValue()
				}
			}
		}
		if got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	r()
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
