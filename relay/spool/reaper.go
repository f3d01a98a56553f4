package spool

import (
	"errors"
	"io/fs"
	"sync"
)

// reaper unlinks delivered messages, or moves them into the pool, in
// batches on its own goroutine: both take the directory lock that every
// intake's create needs, so they stay off the delivery path.
type reaper struct {
	mu      sync.Mutex
	pending []reapItem
	started bool
	closed  bool
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

type reapItem struct {
	id    string
	reuse bool // small enough for the pool
}

func (s *Spool) reapLater(id string, reuse bool) {
	r := &s.reap
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		s.unlinkDone(id, false)
		return
	}
	r.pending = append(r.pending, reapItem{id, reuse})
	if !r.started && !s.manualReap {
		// Started on first use: `relaycar queue` opens a spool and never
		// removes anything.
		r.started = true
		r.wake, r.stop, r.done = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
		go s.reapLoop()
	}
	wake := r.wake
	r.mu.Unlock()
	select {
	case wake <- struct{}{}:
	default:
	}
}

func (s *Spool) reapLoop() {
	r := &s.reap
	defer close(r.done)
	for {
		select {
		case <-r.wake:
			s.reapNow()
		case <-r.stop:
			s.reapNow()
			return
		}
	}
}

// reapNow unlinks every message queued so far.
func (s *Spool) reapNow() {
	r := &s.reap
	r.mu.Lock()
	ids := r.pending
	r.pending = nil
	r.mu.Unlock()
	for _, it := range ids {
		s.unlinkDone(it.id, it.reuse)
	}
}

// unlinkDone removes a message that Remove marked done: into the pool if
// it is small and the pool has room, else away. It does not read the file
// again: a done file never changes back (Update, Bury and compaction
// refuse a done file, Create never reuses a name), so the check would
// cost an open and a read per delivered message for nothing.
// The per-id lock orders it after Remove's append.
func (s *Spool) unlinkDone(id string, reuse bool) {
	defer s.locks.lock(id)()
	if reuse && s.keep(id) {
		return
	}
	if err := s.fs.Remove(s.live(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("unlinking delivered message failed; Load retries", "msg_id", id, "err", err)
	}
	s.placed.take(id)
}

// Close finishes the pending unlinks and stops the reaper. Later Removes
// unlink at once.
func (s *Spool) Close() error {
	r := &s.reap
	r.mu.Lock()
	started, already := r.started, r.closed
	r.closed = true
	r.mu.Unlock()
	if already {
		return nil
	}
	if started {
		close(r.stop)
		<-r.done
	} else {
		s.reapNow()
	}
	s.namePlaced()
	return nil
}

// namePlaced gives the messages still queued in pool files their own
// names, so that the files read as what they are, to an operator and to
// a relaycar older than the one that placed them (ff81479 and later find
// them by their contents anyway). Nothing is synced: a lost rename leaves
// the message where Load finds it.
func (s *Spool) namePlaced() {
	for _, id := range s.placed.ids() {
		unlock := s.locks.lock(id)
		if free, ok := s.placed.take(id); ok {
			if err := s.renameNoReplace(s.freePath(free), s.ownPath(id)); err != nil {
				s.placed.claim(id, free)
				s.log.Warn("naming a queued message failed; the next start does it", "msg_id", id, "err", err)
			}
		}
		unlock()
	}
}
