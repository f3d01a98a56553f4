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
// sees it. A sync's own cost is taken as its bytes at ownBytesPerSecond;
// what it took beyond that is the excess the rules below judge.
const (
	ownBytesPerSecond = 100 << 20
	// slowSync of excess warns at once: a 250 that waited this long may be
	// past a client's timeout.
	slowSync = time.Second
	// A window warns when a quarter of its syncs had slowSyncEach of
	// excess. On a disk of its own a small commit's sync takes well under
	// a millisecond and only a few in a thousand stall; beside a neighbour
	// streaming writes two thirds of them did here (239 of 353 in 10 s).
	// Counting slow syncs, not averaging, keeps one long stall in a quiet
	// window from setting it off.
	slowSyncEach  = 5 * time.Millisecond
	syncWindow    = 10 * time.Second // at least, and syncWindowMin syncs
	syncWindowMin = 20
	// syncWindowMax closes a window of few syncs (low traffic); it is
	// judged from syncWindowFew.
	syncWindowMax = 5 * time.Minute
	syncWindowFew = 5
	// slowSyncEvery bounds the warnings to one per period.
	slowSyncEvery = 5 * time.Minute
)

// syncWatch judges the spool's syncs.
type syncWatch struct {
	// slow is slowSync; a test lowers it to see real commits warn.
	slow time.Duration

	mu     sync.Mutex
	start  time.Time
	n      int   // syncs in the window
	slowN  int   // of them with slowSyncEach of excess
	wrote  int64 // bytes the window's syncs were told of
	warned time.Time
}

func newSyncWatch() syncWatch {
	return syncWatch{slow: slowSync}
}

// observe records one sync that took took and wrote out wrote bytes of
// the spool's own. It returns the log attributes of a warning to give, or
// nil.
func (w *syncWatch) observe(now time.Time, took time.Duration, wrote int64) []any {
	excess := took - time.Duration(wrote)*(time.Second/ownBytesPerSecond)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.start.IsZero() {
		w.start = now
	}
	w.n++
	w.wrote += wrote
	if excess >= slowSyncEach {
		w.slowN++
	}
	var attrs []any
	if excess >= w.slow {
		attrs = []any{"took", took.Round(time.Millisecond).String(), "bytes", wrote}
	}
	if age := now.Sub(w.start); age >= syncWindow && w.n >= syncWindowMin || age >= syncWindowMax {
		n, slowN, perSync := w.n, w.slowN, w.wrote/int64(w.n)
		w.start, w.n, w.slowN, w.wrote = now, 0, 0, 0
		if attrs == nil && n >= syncWindowFew && slowN*4 >= n {
			attrs = []any{"slow_syncs", slowN, "syncs", n, "over", age.Round(time.Second).String(), "bytes_per_sync", perSync}
		}
	}
	if attrs == nil || !w.warned.IsZero() && now.Sub(w.warned) < slowSyncEvery {
		return nil
	}
	w.warned = now
	return attrs
}

// observeSync is the spool's syncers' Observe.
func (s *Spool) observeSync(took time.Duration, wrote int64) {
	attrs := s.watch.observe(time.Now(), took, wrote)
	if attrs == nil {
		return
	}
	s.log.Warn("spool syncs slow; every 250 waits for them",
		append(attrs, "dir", s.dir,
			"hint", "syncfs writes out everything written on the spool's file system, the spool's own bytes and other processes' alike: if the spool wrote little, give it a file system of its own")...)
}
