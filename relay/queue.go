package relay

import (
	"container/heap"
	"context"
	"errors"
	"sync"
	"time"
)

// queue holds the live messages in memory, ordered by next attempt. It is
// rebuilt from the spool files at start; the files stay the truth.
type queue struct {
	mu    sync.Mutex
	items map[string]*item
	due   itemHeap
	wake  chan struct{}
	now   func() time.Time
	// changed is closed at the next change of the queue, for waitIdle;
	// nil while nobody waits.
	changed chan struct{}
}

type item struct {
	env *Envelope
	at  time.Time
	// received is a copy of env.ReceivedAt, readable without racing the
	// worker that owns env.
	received time.Time
	index    int  // in due; -1 while a worker has it
	gone     bool // dropped while a worker had it
}

func newQueue(now func() time.Time) *queue {
	return &queue{items: map[string]*item{}, wake: make(chan struct{}, 1), now: now}
}

// signal wakes waitIdle; q.mu is held.
func (q *queue) signal() {
	if q.changed != nil {
		close(q.changed)
		q.changed = nil
	}
}

func (q *queue) poke() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// add schedules env at env.NextAttempt. Bodies stay in the spool: a
// first attempt reads the file just written, from the page cache.
func (q *queue) add(env *Envelope) {
	q.mu.Lock()
	it := &item{env: env, at: env.NextAttempt, received: env.ReceivedAt}
	q.items[env.ID] = it
	heap.Push(&q.due, it)
	q.signal()
	q.mu.Unlock()
	q.poke()
}

// done returns a worker's item: rescheduled at env.NextAttempt if keep,
// forgotten otherwise.
func (q *queue) done(it *item, keep bool) {
	q.mu.Lock()
	if !keep || it.gone {
		delete(q.items, it.env.ID)
	} else {
		it.at = it.env.NextAttempt
		heap.Push(&q.due, it)
	}
	q.signal()
	q.mu.Unlock()
	q.poke()
}

// errBusy: a worker is delivering the message right now.
var errBusy = errors.New("message is being delivered right now; try again in a moment")

// retry makes a message due now. It reports whether the id is queued, or
// errBusy while a worker holds it (its outcome is not known yet).
func (q *queue) retry(id string) (bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	it, ok := q.items[id]
	if !ok {
		return false, nil
	}
	if it.index < 0 {
		return true, errBusy
	}
	it.at = q.now()
	heap.Fix(&q.due, it.index)
	q.signal()
	q.poke()
	return true, nil
}

func (q *queue) retryAll() int {
	q.mu.Lock()
	now := q.now()
	for _, it := range q.due {
		it.at = now
	}
	heap.Init(&q.due)
	n := len(q.items)
	q.signal()
	q.mu.Unlock()
	q.poke()
	return n
}

// forget removes a message an operator dropped.
func (q *queue) forget(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	it, ok := q.items[id]
	if !ok {
		return
	}
	if it.index >= 0 {
		heap.Remove(&q.due, it.index)
		delete(q.items, id)
		q.signal()
	} else {
		it.gone = true
	}
}

// envelopes returns the queued messages' envelopes, in no order. Only for
// after the workers stopped: a worker owns the envelope it holds.
func (q *queue) envelopes() []*Envelope {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]*Envelope, 0, len(q.items))
	for _, it := range q.items {
		out = append(out, it.env)
	}
	return out
}

func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// oldest returns when the oldest queued message was received (zero if none).
func (q *queue) oldest() time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	var t time.Time
	for _, it := range q.items {
		if r := it.received; t.IsZero() || r.Before(t) {
			t = r
		}
	}
	return t
}

// state reports how many items workers hold and whether any is due now.
func (q *queue) state() (busy int, dueNow bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.stateLocked()
}

func (q *queue) stateLocked() (busy int, dueNow bool) {
	busy = len(q.items) - len(q.due)
	return busy, len(q.due) > 0 && !q.due[0].at.After(q.now())
}

// waitIdle returns once no worker holds an item and none is due, or when
// ctx ends. It looks again at each change of the queue, not on a timer:
// only a change (a worker taking or returning an item, a drop) can make
// it idle; the clock only makes items due.
func (q *queue) waitIdle(ctx context.Context) {
	for {
		q.mu.Lock()
		if busy, due := q.stateLocked(); busy == 0 && !due {
			q.mu.Unlock()
			return
		}
		if q.changed == nil {
			q.changed = make(chan struct{})
		}
		changed := q.changed
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// dispatch hands due items to out until ctx ends.
func (q *queue) dispatch(ctx context.Context, out chan<- *item) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		q.mu.Lock()
		var next *item
		wait := time.Hour
		if len(q.due) > 0 {
			if d := q.due[0].at.Sub(q.now()); d <= 0 {
				next = heap.Pop(&q.due).(*item)
				q.signal()
			} else {
				wait = d
			}
		}
		q.mu.Unlock()
		if next != nil {
			select {
			case out <- next:
				continue
			case <-ctx.Done():
				q.done(next, true)
				return
			}
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-q.wake:
		case <-timer.C:
		}
	}
}

type itemHeap []*item

func (h itemHeap) Len() int { return len(h) }
func (h itemHeap) Less(i, j int) bool {
	if !h[i].at.Equal(h[j].at) {
		return h[i].at.Before(h[j].at)
	}
	return h[i].env.ID < h[j].env.ID
}
func (h itemHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *itemHeap) Push(x any) {
	it := x.(*item)
	it.index = len(*h)
	*h = append(*h, it)
}
func (h *itemHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	it.index = -1
	return it
}
