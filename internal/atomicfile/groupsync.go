package atomicfile

import (
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// GroupSync batches syncs of one file system (group commit): a caller waits for
// one sync that started after its own writes; every caller that arrived
// while a sync ran shares the next one.
type GroupSync struct {
	// Dir is any path on the file system to sync.
	Dir string
	// Observe, if set before the first Sync, gets each sync's duration and
	// the bytes callers said (Wrote) they had written before it started,
	// after the sync's waiters are released. A sync writes out everything
	// dirty on the file system, so the two tell the callers' own work from
	// other writers'.
	Observe   func(took time.Duration, wrote int64)
	wrote     atomic.Int64
	mu        sync.Mutex
	cond      *sync.Cond
	requested uint64
	completed uint64
	running   bool
	// failed is sticky: after a failed sync the kernel may have dropped
	// the dirty pages and a later sync can succeed without them, so no
	// later caller may be told its data is durable.
	failed error
	syncs  uint64
	// dir stays open: Linux reports a writeback error once per open file
	// description, so a fresh handle per sync could miss one.
	dir *os.File
}

// Sync returns once everything written on Dir's file system before the
// call is durable.
func (d *GroupSync) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cond == nil {
		d.cond = sync.NewCond(&d.mu)
	}
	d.requested++
	ticket := d.requested
	for {
		if d.failed != nil {
			return d.failed
		}
		if d.completed >= ticket {
			return nil
		}
		if !d.running {
			d.running = true
			covers := d.requested
			d.mu.Unlock()
			wrote, start := d.wrote.Swap(0), time.Now()
			err := d.syncOnce()
			took := time.Since(start)
			d.mu.Lock()
			d.running = false
			d.completed = covers
			if err != nil {
				d.failed = err
			} else {
				d.syncs++
			}
			d.cond.Broadcast()
			if d.Observe != nil {
				d.mu.Unlock()
				d.Observe(took, wrote)
				d.mu.Lock()
			}
			continue
		}
		d.cond.Wait()
	}
}

// Wrote tells Observe that n more bytes were written for the next sync.
func (d *GroupSync) Wrote(n int64) { d.wrote.Add(n) }

func (d *GroupSync) syncOnce() error {
	if d.dir == nil {
		f, err := os.Open(d.Dir)
		if err != nil {
			return err
		}
		d.dir = f
	}
	return syncFS(d.dir)
}

// Err is the sticky sync failure, if any: the file system lost writes and
// nothing written since can be called durable until the process restarts.
func (d *GroupSync) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failed
}

// Syncs is the number of file-system syncs that succeeded so far.
func (d *GroupSync) Syncs() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.syncs
}
