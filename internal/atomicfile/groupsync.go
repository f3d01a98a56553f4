package atomicfile

import "sync"

// GroupSync batches syncs of one file system (group commit): a caller waits for
// one sync that started after its own writes; every caller that arrived
// while a sync ran shares the next one.
type GroupSync struct {
	// Dir is any path on the file system to sync.
	Dir       string
	mu        sync.Mutex
	cond      *sync.Cond
	requested uint64
	completed uint64
	running   bool
	lastErr   error
	syncs     uint64
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
		if d.completed >= ticket {
			return d.lastErr
		}
		if !d.running {
			d.running = true
			covers := d.requested
			d.mu.Unlock()
			err := syncFS(d.Dir)
			d.mu.Lock()
			d.running = false
			d.syncs++
			d.completed, d.lastErr = covers, err
			d.cond.Broadcast()
			continue
		}
		d.cond.Wait()
	}
}

// Syncs is the number of file-system syncs done so far.
func (d *GroupSync) Syncs() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.syncs
}
