package spool

import (
	"sync"
	"time"
)

// A commit is one syncfs(2), which writes out everything dirty on the
// spool's file system, not only the spool's files: another process writing
// there (logs, a backup, other pods' volumes on a node's disk) makes every
// 250 wait for its data. relaycar cannot fix that; the operator can, by
// giving the spool a file system of its own, so the spool says when it
// sees it.
const (
	// slowSync warns at once: a 250 that waited this long may be past a
	// client's timeout.
	slowSync = time.Second
	// slowSyncMean over a window warns when the spool itself wrote less
	// than ownBytesPerSync per sync: on a disk of its own a small commit's
	// sync averages well under a millisecond, stalls included, while a
	// neighbour streaming writes pushed it to 10-15 ms here.
	slowSyncMean    = 5 * time.Millisecond
	ownBytesPerSync = 1 << 20
	syncWindow      = 10 * time.Second
	syncWindowMin   = 20 // syncs a window needs to be judged
	// slowSyncEvery bounds the warnings to one per period.
	slowSyncEvery = 5 * time.Minute
)

// syncWatch judges the spool's syncs.
type syncWatch struct {
	// slow is slowSync; a test lowers it to see real commits warn.
	slow time.Duration

	mu     sync.Mutex
	start  time.Time
	n      int
	total  time.Duration
	bytes0 int64 // the spool's written count when the last window closed
	warned time.Time
}

func newSyncWatch() syncWatch {
	return syncWatch{slow: slowSync}
}

// observe records one sync that took took, with written the spool's
// committed bytes so far. It returns the log attributes of a warning to
// give, or nil.
func (w *syncWatch) observe(now time.Time, took time.Duration, written int64) []any {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.start.IsZero() {
		w.start = now // bytes0 is 0: the spool had written nothing
	}
	w.n++
	w.total += took
	var attrs []any
	if took >= w.slow {
		attrs = []any{"took", took.Round(time.Millisecond).String()}
	}
	if now.Sub(w.start) >= syncWindow {
		n, mean, perSync := w.n, w.total/time.Duration(w.n), (written-w.bytes0)/int64(w.n)
		w.start, w.n, w.total, w.bytes0 = now, 0, 0, written
		if attrs == nil && n >= syncWindowMin && mean >= slowSyncMean && perSync < ownBytesPerSync {
			attrs = []any{"mean", mean.Round(100 * time.Microsecond).String(), "syncs", n, "bytes_per_sync", perSync}
		}
	}
	if attrs == nil || !w.warned.IsZero() && now.Sub(w.warned) < slowSyncEvery {
		return nil
	}
	w.warned = now
	return attrs
}

// observeSync is the spool's syncers' Observe.
func (s *Spool) observeSync(took time.Duration) {
	attrs := s.watch.observe(time.Now(), took, s.written.Load())
	if attrs == nil {
		return
	}
	s.log.Warn("spool syncs slow; every 250 waits for them",
		append(attrs, "dir", s.dir,
			"hint", "syncfs writes out everything written on the spool's file system: if the spool wrote little, other writers there are the cause; give the spool a file system of its own")...)
}
