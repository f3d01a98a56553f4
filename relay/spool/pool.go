package spool

import (
	"os"
	"path/filepath"
	"sync"
)

// Delivered messages' files are kept for reuse instead of unlinked: taking
// one is an open, where a fresh file costs an inode and its blocks, and
// an unlink gives both back. On ext4 that was a fifth of the CPU of
// small-message intake. Only small files are kept, so the pool never
// holds much disk.
const (
	poolMax      = 256
	poolMaxBytes = 64 << 10
	freePrefix   = ".free-"
)

// pool holds the ids of the free files, <dir>/.free-<id>. A file becomes
// ready only after a sync that started after it came back (its rename, or
// the done record of the message placed in it): by then the done record
// and the free name are durable, so however a crash leaves the new
// message's writes, the delivered message is not left behind under its old
// name with another message's bytes, nor read as not delivered.
type pool struct {
	mu    sync.Mutex
	ready []string
	soon  []freeFile
}

// placed maps the messages committed in the pool file they were written
// over to that file's free name. Renaming a file costs its next sync: on
// ext4 without a journal an fsync or fdatasync of a file renamed since
// its last one also writes out the directory (ext4_sync_parent), which
// made a lone commit's fdatasync take twice as long as one of a file
// never renamed; and with sessions committing together the two renames
// per message were 8% of the CPU. So such a message keeps the pool
// file's name until it is delivered, and the file goes back to the pool
// without a rename. Load gives each one its own name (loader.loadFree),
// and Close does so for those still queued at shutdown.
type placed struct {
	mu sync.Mutex
	m  map[string]string // message id -> free name
}

func (p *placed) get(id string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	free, ok := p.m[id]
	return free, ok
}

// claim puts id unless it is there already.
func (p *placed) claim(id, free string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.m[id]; ok {
		return false
	}
	if p.m == nil {
		p.m = map[string]string{}
	}
	p.m[id] = free
	return true
}

// take forgets id, returning the free name it had.
func (p *placed) take(id string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	free, ok := p.m[id]
	delete(p.m, id)
	return free, ok
}

func (p *placed) ids() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]string, 0, len(p.m))
	for id := range p.m {
		ids = append(ids, id)
	}
	return ids
}

type freeFile struct {
	id  string
	gen uint64 // syncs done when it came back
}

func (s *Spool) freePath(id string) string { return filepath.Join(s.dir, freePrefix+id) }

// keep puts a delivered message's file into the pool, renamed unless it
// is a placed message's pool file already; false means the caller
// unlinks it. The caller holds id's lock.
func (s *Spool) keep(id string) bool {
	p := &s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	// On a full disk a delivered file is space to give back, not to keep.
	if len(p.ready)+len(p.soon) >= poolMax || s.full.Load() != nil {
		return false
	}
	// A message left in place is in a pool file already.
	free, ok := s.placed.take(id)
	if !ok {
		if s.fs.Rename(s.live(id), s.freePath(id)) != nil {
			return false
		}
		free = id
	}
	p.soon = append(p.soon, freeFile{id: free, gen: s.sync.Syncs()})
	return true
}

// adopt takes a free file Load found into the pool, or unlinks it.
func (s *Spool) adopt(id string) {
	p := &s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if !validID(id) || len(p.ready)+len(p.soon) >= poolMax {
		s.fs.Remove(s.freePath(id))
		return
	}
	p.soon = append(p.soon, freeFile{id: id, gen: s.sync.Syncs()})
}

// take returns a ready free file's id.
func (s *Spool) take() (string, bool) {
	p := &s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	// Two more syncs: the first may have been running at the rename.
	n := s.sync.Syncs()
	i := 0
	for i < len(p.soon) && p.soon[i].gen+2 <= n {
		p.ready = append(p.ready, p.soon[i].id)
		i++
	}
	p.soon = p.soon[i:]
	if len(p.ready) == 0 {
		return "", false
	}
	id := p.ready[len(p.ready)-1]
	p.ready = p.ready[:len(p.ready)-1]
	return id, true
}

// reuse opens a ready free file for a new message to be written over;
// nil when there is none. The old contents stay beyond what the new
// message writes; they cannot pass for its records (see readState).
func (s *Spool) reuse() (File, string) {
	id, ok := s.take()
	if !ok {
		return nil, ""
	}
	f, err := s.fs.OpenFile(s.freePath(id), os.O_RDWR, 0)
	if err != nil {
		s.fs.Remove(s.freePath(id))
		return nil, ""
	}
	return f, id
}

// drainPool unlinks every free file: the disk is full and they are space.
func (s *Spool) drainPool() {
	p := &s.pool
	p.mu.Lock()
	ids := p.ready
	for _, f := range p.soon {
		ids = append(ids, f.id)
	}
	p.ready, p.soon = nil, nil
	p.mu.Unlock()
	for _, id := range ids {
		s.fs.Remove(s.freePath(id))
	}
}
