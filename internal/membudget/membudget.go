// Package membudget is the process-wide byte budget for message bodies held
// whole in memory.
//
// Upstreams whose API needs the entire body in memory (base64 JSON, the
// SendGrid mapping) reserve its size with [Budget.Acquire] before they
// build the request, so concurrent large deliveries queue instead of
// growing the heap past the container's memory limit. Intake uses
// [Budget.TryAcquire], which never waits, so a session that cannot be
// given memory is answered 451 4.3.1 at once rather than held open.
//
// Waiters are served strictly in arrival order: a large request at the
// head of the queue blocks later small ones, so it cannot be starved by a
// stream of small requests that each fit.
package membudget

import (
	"container/list"
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Budget is a FIFO-fair counting semaphore over bytes. The zero value is
// not usable; call [New]. A nil *Budget imposes no limit, so code paths and
// tests that have no budget need no special case.
type Budget struct {
	limit int64

	mu      sync.Mutex
	cur     int64        // bytes granted; guarded by mu
	waiters list.List    // of *waiter, oldest first; guarded by mu
	inUse   atomic.Int64 // mirror of cur for metrics without taking mu
	waits   atomic.Uint64
	tried   int64 // bytes granted by TryAcquire; guarded by mu
}

// TryShare is the part of the budget TryAcquire may hold while deliveries
// are queued: intake keeps taking mail during a backlog of big API
// deliveries, and those are never starved by it.
const TryShare = 4 // one quarter

type waiter struct {
	n     int64
	ready chan struct{} // closed when the bytes are granted
}

// New returns a budget of limit bytes. limit must be positive: a zero
// budget would block every delivery forever, which is never what a
// configuration meant.
func New(limit int64) *Budget {
	if limit <= 0 {
		panic(fmt.Sprintf("membudget: limit must be positive, got %d", limit))
	}
	return &Budget{limit: limit}
}

// Acquire waits until n bytes are free and reserves them; release gives
// them back and may be called any number of times. It fails only when ctx
// ends first, and then nothing is reserved.
//
// A request larger than what deliveries may hold — the limit less the
// intake's share (TryShare) — is clamped to it: such a message still goes
// through, alone among deliveries, and the intake's share beside it means
// intake can never keep it waiting for ever. The process then holds more
// than the budget for that one message, which beats refusing it forever.
// n <= 0 reserves nothing.
//
// A call that has to queue is counted in [Budget.Waits].
func (b *Budget) Acquire(ctx context.Context, n int64) (release func(), err error) {
	if b == nil || n <= 0 {
		return func() {}, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n = min(n, b.limit-b.limit/TryShare)
	b.mu.Lock()
	if b.waiters.Len() == 0 && b.cur+n <= b.limit {
		b.grantLocked(n)
		b.mu.Unlock()
		return b.releaser(n), nil
	}
	w := &waiter{n: n, ready: make(chan struct{})}
	elem := b.waiters.PushBack(w)
	b.waits.Add(1)
	b.mu.Unlock()

	select {
	case <-w.ready:
		return b.releaser(n), nil
	case <-ctx.Done():
		b.mu.Lock()
		select {
		case <-w.ready:
			// Granted while ctx ended: the caller is told it failed, so
			// hand the bytes straight back.
			b.giveBackLocked(n)
		default:
			front := b.waiters.Front() == elem
			b.waiters.Remove(elem)
			// A head waiter blocks everyone behind it; once it leaves,
			// those that now fit must be woken.
			if front {
				b.notifyLocked()
			}
		}
		b.mu.Unlock()
		return nil, ctx.Err()
	}
}

// TryAcquire reserves n bytes only if they are free now. While requests
// are queued it may overtake them, but only within a quarter of the limit
// (TryShare): refusing all mail because a large delivery waits for memory
// would stop intake for no reason, and overtaking without bound could
// starve that delivery. ok false means the caller should refuse with 451
// 4.3.1. Clamping and n <= 0 are as for [Budget.Acquire].
func (b *Budget) TryAcquire(n int64) (release func(), ok bool) {
	if b == nil || n <= 0 {
		return func() {}, true
	}
	n = min(n, b.limit)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cur+n > b.limit || (b.waiters.Len() != 0 && b.tried+n > b.limit/TryShare) {
		return nil, false
	}
	b.grantLocked(n)
	b.tried += n
	var done atomic.Bool
	return func() {
		if !done.CompareAndSwap(false, true) {
			return
		}
		b.mu.Lock()
		b.tried -= n
		b.giveBackLocked(n)
		b.mu.Unlock()
	}, true
}

// Limit is the budget's size in bytes (relaycar_memory_budget_bytes).
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}

// InUse is the number of bytes reserved now
// (relaycar_memory_budget_in_use_bytes).
func (b *Budget) InUse() int64 {
	if b == nil {
		return 0
	}
	return b.inUse.Load()
}

// Waits counts the Acquire calls that had to queue, including those whose
// ctx ended while queued (relaycar_memory_budget_waits_total).
func (b *Budget) Waits() uint64 {
	if b == nil {
		return 0
	}
	return b.waits.Load()
}

// Collectors returns the budget's three metrics, so their names live in one
// place; register them on the relay's registry.
func (b *Budget) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_memory_budget_bytes",
			Help: "Size of the memory budget for message bodies held whole in memory."},
			func() float64 { return float64(b.Limit()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_memory_budget_in_use_bytes",
			Help: "Bytes of the memory budget reserved now."},
			func() float64 { return float64(b.InUse()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "relaycar_memory_budget_waits_total",
			Help: "Reservations that had to wait for memory budget."},
			func() float64 { return float64(b.Waits()) }),
	}
}

func (b *Budget) grantLocked(n int64) {
	b.cur += n
	b.inUse.Store(b.cur)
}

func (b *Budget) giveBackLocked(n int64) {
	b.cur -= n
	if b.cur < 0 {
		panic("membudget: released more than held")
	}
	b.inUse.Store(b.cur)
	b.notifyLocked()
}

// notifyLocked grants waiters in order while the head fits; it stops at the
// first that does not, which is what makes the budget FIFO-fair.
func (b *Budget) notifyLocked() {
	for {
		front := b.waiters.Front()
		if front == nil {
			return
		}
		w := front.Value.(*waiter)
		if b.cur+w.n > b.limit {
			return
		}
		b.grantLocked(w.n)
		b.waiters.Remove(front)
		close(w.ready)
	}
}

// releaser returns an idempotent release: a deferred release after an
// explicit early one must not free bytes someone else now holds.
func (b *Budget) releaser(n int64) func() {
	var done atomic.Bool
	return func() {
		if !done.CompareAndSwap(false, true) {
			return
		}
		b.mu.Lock()
		b.giveBackLocked(n)
		b.mu.Unlock()
	}
}
