package spool

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

const (
	fileMode = 0o600
	dirMode  = 0o700
	// bufSize bounds what an intake holds in memory, whatever the message size.
	bufSize = 64 << 10
	// compactAt is the record bytes after which Update rewrites the file,
	// so a message retried for two days does not make every Update scan
	// hundreds of states.
	compactAt = 64 << 10
)

// Spool is the durable queue on disk; see the package doc for the format.
type Spool struct {
	dir, dead string
	fs        FS
	log       *slog.Logger
	// gs is the group sync of the spool's file system, shared with file
	// upstreams through SyncFor.
	gs *atomicfile.GroupSync
	// sync is what commits wait for: gs, or FS.SyncFS when FS is not the
	// real file system (tests).
	sync  syncer
	lock  *os.File
	locks idLocks
	reap  reaper
	// full is the free space seen when a commit last failed for lack of
	// space, nil after a commit succeeds.
	full      atomic.Pointer[int64]
	compactAt int64
	// manualReap leaves the reaper to the test, so that the operations of
	// a workload come in a fixed order.
	manualReap bool
	// writers recycles intake buffers: a fresh 64 KiB per message was a
	// good part of the garbage collector's work under load.
	writers sync.Pool
	pool    pool
	placed  placed
	watch   syncWatch

	// maxBytes caps what the spool's files may take (0: no cap); used is
	// what they took at usedAt, plus the commits since (usage).
	maxBytes  int64
	used      atomic.Int64
	usedAt    atomic.Int64 // unix nanoseconds
	measuring atomic.Bool
	// inflight is what messages being written hold (Writer.hold);
	// committed counts every byte commits added, so a walk can add those
	// that landed while it ran.
	inflight  atomic.Int64
	committed atomic.Int64
	// writing counts the Writers not yet committed or aborted, so that a
	// commit alone can fdatasync (Writer.commitInPlace).
	writing atomic.Int64
}

// Options configure Open.
type Options struct {
	Log *slog.Logger
	// FS replaces the real file system (tests). Commits then sync through
	// FS.SyncFS, one at a time.
	FS FS
	// MaxBytes caps the bytes the spool's files may take (spool.max_bytes,
	// an emptyDir's sizeLimit); 0 is no cap. Room and Writable refuse
	// before it is reached, and a Writer whose message would cross it.
	MaxBytes int64
}

type syncer interface {
	Sync() error
	// Wrote counts bytes the next sync writes out, for the slow-sync
	// warning (syncwatch.go).
	Wrote(n int64)
	Err() error
	// Syncs counts the syncs that succeeded, for the pool's "synced since".
	Syncs() uint64
}

// Open creates the directories if needed. It does not read the spool:
// the serving process calls Lock, then Load.
func Open(dir string, o Options) (*Spool, error) {
	s := &Spool{dir: dir, dead: filepath.Join(dir, "dead"), fs: o.FS, log: o.Log, compactAt: compactAt, watch: newSyncWatch(),
		maxBytes: o.MaxBytes}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.gs = &atomicfile.GroupSync{Dir: dir, Observe: s.observeSync}
	s.sync = s.gs
	if s.fs == nil {
		s.fs = OS{}
	} else {
		s.sync = &fsSyncer{fs: s.fs, dir: dir, observe: s.observeSync}
	}
	for _, d := range []string{dir, s.dead} {
		if err := s.fs.MkdirAll(d, dirMode); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// fsSyncer syncs through an FS; like GroupSync its failure is sticky.
type fsSyncer struct {
	fs      FS
	dir     string
	observe func(took time.Duration, wrote int64)
	wrote   atomic.Int64
	mu      sync.Mutex
	failed  error
	syncs   uint64
}

func (f *fsSyncer) Wrote(n int64) { f.wrote.Add(n) }

func (f *fsSyncer) Sync() error {
	f.mu.Lock()
	if err := f.failed; err != nil {
		f.mu.Unlock()
		return err
	}
	wrote, start := f.wrote.Swap(0), time.Now()
	err := f.fs.SyncFS(f.dir)
	took := time.Since(start)
	if f.failed = err; err == nil {
		f.syncs++
	}
	f.mu.Unlock()
	f.observe(took, wrote)
	return err
}

func (f *fsSyncer) Syncs() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncs
}

func (f *fsSyncer) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed
}

// Dir is the spool directory.
func (s *Spool) Dir() string { return s.dir }

// SyncFor returns the spool's group syncer when dir is on the spool's file
// system (one syncfs then covers both), else a syncer of its own.
func (s *Spool) SyncFor(dir string) *atomicfile.GroupSync {
	var a, b syscall.Stat_t
	if syscall.Stat(dir, &a) == nil && syscall.Stat(s.dir, &b) == nil && a.Dev == b.Dev {
		return s.gs
	}
	return &atomicfile.GroupSync{Dir: dir}
}

// ErrLocked means another relaycar serves this spool.
var ErrLocked = errors.New("spool is in use by a running relaycar")

// Lock takes the spool's exclusive lock for the life of the process, so two
// relays never deliver the same files, and `relaycar queue` knows to go
// through the admin API instead of the files. The lock is on the real file
// system whatever FS is: flock needs a descriptor.
func (s *Spool) Lock() error {
	f, err := os.OpenFile(filepath.Join(s.dir, ".lock"), os.O_CREATE|os.O_RDWR, fileMode)
	if err != nil {
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return ErrLocked
		}
		return err
	}
	s.lock = f
	return nil
}

// Locked reports whether another process holds the spool lock.
func (s *Spool) Locked() bool {
	if s.lock != nil {
		return false
	}
	if err := s.Lock(); err != nil {
		return errors.Is(err, ErrLocked)
	}
	s.Unlock()
	return false
}

// Unlock releases the lock taken by Lock.
func (s *Spool) Unlock() {
	if s.lock != nil {
		s.lock.Close()
		s.lock = nil
	}
}

// NewID returns a time-sortable id: `ls` and `queue ls` list oldest first.
// It uses only [0-9a-z], so it never collides with ".tmp-" names.
func NewID(now time.Time) string {
	var b [8]byte
	rand.Read(b[:])
	r := strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
	return fmt.Sprintf("%013s%s", strconv.FormatInt(now.UnixMicro(), 36), r[:10])
}

// validID keeps ids out of paths ("../") and out of the names the spool
// uses itself (".tmp-", ".lock").
func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// live is where message id's file is: a pool file's name while it stays
// where its commit wrote it (placed), else <id>.msg.
func (s *Spool) live(id string) string {
	if free, ok := s.placed.get(id); ok {
		return s.freePath(free)
	}
	return s.ownPath(id)
}

// ownPath is <dir>/<id>.msg, the name a live message has once it is not
// (or no longer) placed.
func (s *Spool) ownPath(id string) string { return filepath.Join(s.dir, id+".msg") }

func (s *Spool) deadPath(id string) string { return filepath.Join(s.dead, id+".msg") }

func tempPath(dir, id string) string {
	return filepath.Join(dir, atomicfile.TempPrefix+id+".msg")
}

// idLocks serialises the operations on one message (a worker's Update, an
// operator's Drop, a compaction's rename) without one lock for the spool.
type idLocks struct {
	mu sync.Mutex
	m  map[string]*idLock
}

type idLock struct {
	mu   sync.Mutex
	refs int
}

func (l *idLocks) lock(id string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[string]*idLock{}
	}
	e := l.m[id]
	if e == nil {
		e = &idLock{}
		l.m[id] = e
	}
	e.refs++
	l.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		l.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(l.m, id)
		}
		l.mu.Unlock()
	}
}

// readFile returns what a .msg file says, or an error wrapping
// fs.ErrNotExist for a delivered one.
func (s *Spool) readFile(path, id string) (*state, error) {
	f, err := s.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := readState(f, id)
	switch {
	case err != nil:
		return nil, err
	case st.done:
		return nil, fmt.Errorf("%s: delivered: %w", id, fs.ErrNotExist)
	case st.env == nil:
		return nil, corrupt("no valid envelope record")
	}
	return st, nil
}

// Get reads one live envelope: the last complete record, even while the
// serving process appends.
func (s *Spool) Get(id string) (*Envelope, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	st, err := s.readFile(s.live(id), id)
	if errors.Is(err, fs.ErrNotExist) {
		if env, verr := s.readV1(filepath.Join(s.dir, id+".json"), id); verr == nil {
			return env, nil
		}
	}
	if err != nil {
		return nil, err
	}
	return st.env, nil
}

// List returns the live envelopes oldest first without changing anything,
// for `relaycar queue ls` and /api/queue beside a running relay. Until Load
// migrates them, v1 entries are listed too.
func (s *Spool) List() ([]*Envelope, error) { return s.list(s.dir, false) }

// Dead returns the dead letters oldest first.
func (s *Spool) Dead() ([]*Envelope, error) { return s.list(s.dead, true) }

// CountDead is len(Dead()): the gauge never counts files /api/dead does
// not show.
func (s *Spool) CountDead() int {
	envs, _ := s.Dead()
	return len(envs)
}

func (s *Spool) list(dir string, dead bool) ([]*Envelope, error) {
	entries, err := s.fs.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	byID := map[string]*Envelope{}
	for _, e := range entries {
		name := e.Name()
		if !dead && !e.IsDir() && strings.HasPrefix(name, freePrefix) {
			if env := s.readPlaced(filepath.Join(dir, name), name[len(freePrefix):]); env != nil {
				byID[env.ID] = env
			}
			continue
		}
		if e.IsDir() || strings.HasPrefix(name, ".") {
			continue
		}
		switch {
		case strings.HasSuffix(name, ".msg"):
			id := strings.TrimSuffix(name, ".msg")
			st, err := s.readFile(filepath.Join(dir, name), id)
			// A live file with a dead reason is being buried.
			if err == nil && (dead || st.env.DeadReason == "") {
				byID[id] = st.env
			}
		case strings.HasSuffix(name, ".json"):
			id := strings.TrimSuffix(name, ".json")
			if _, ok := byID[id]; ok {
				continue
			}
			if env, err := s.readV1(filepath.Join(dir, name), id); err == nil {
				byID[id] = env
			}
		}
		// Anything else is being written, broken or moved meanwhile: Load
		// handles those.
	}
	envs := make([]*Envelope, 0, len(byID))
	for _, env := range byID {
		envs = append(envs, env)
	}
	slices.SortFunc(envs, func(a, b *Envelope) int { return strings.Compare(a.ID, b.ID) })
	return envs, nil
}

// readPlaced returns the queued message a commit left in the pool
// file .free-<free> (Spool.placed), or nil when the file is free: the
// delivered message it was kept from, a new one not yet committed, or one
// delivered since.
func (s *Spool) readPlaced(path, free string) *Envelope {
	f, err := s.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := readState(f, "")
	if err != nil || !st.placedIn(free) || st.env.DeadReason != "" {
		return nil
	}
	return st.env
}

// placedIn reports whether the state read from the free file .free-<free>
// is a message placed there, not yet delivered: an envelope of another id
// (the file's own id is the delivered message it was kept from) and no
// done record. Its body is not checked here.
func (st *state) placedIn(free string) bool {
	return st.env != nil && !st.done && st.env.ID != free && validID(st.env.ID)
}

// readV1 reads a v1 envelope (.json).
func (s *Spool) readV1(path, id string) (*Envelope, error) {
	f, err := s.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var env Envelope
	if err := json.NewDecoder(f).Decode(&env); err != nil {
		return nil, corrupt("v1 envelope: %v", err)
	}
	if env.ID != id || !validID(env.ID) {
		return nil, corrupt("v1 envelope id %q does not match the file name", env.ID)
	}
	return &env, nil
}

// ErrFull means the spool's file system has no room for a message.
var ErrFull = errors.New("spool file system full")

// Writable reports whether the spool can take a message, for /readyz: no
// sync has failed (the kernel may have dropped writes, so nothing later
// can be called durable), the file system is writable with at least
// minFree bytes and an inode free, and, after a commit failed for lack of
// space, some space has been freed since (statfs alone can show room that
// a commit did not find). On a file system smaller than ten times minFree
// the want is a tenth of it: a small volume that takes small messages is
// usable, and a failed commit still turns it unready.
func (s *Spool) Writable(minFree int64) error {
	if err := s.sync.Err(); err != nil {
		return err
	}
	d, err := s.fs.OpenFile(s.dir, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	fi, err := d.Stat()
	d.Close()
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("spool.dir %s is not a directory", s.dir)
	}
	u, err := s.fs.Statfs(s.dir)
	if err != nil {
		return err
	}
	if u.TotalBytes > 0 {
		minFree = min(minFree, u.TotalBytes/10)
	}
	switch {
	case u.ReadOnly:
		return fmt.Errorf("spool file system is read-only")
	case u.FreeInodes == 0:
		return fmt.Errorf("%w: no inode free", ErrFull)
	}
	if p := s.full.Load(); p != nil {
		if u.FreeBytes < minFree || u.FreeBytes <= *p {
			return fmt.Errorf("%w: the last commit failed for lack of space and none was freed since (%d bytes free)", ErrFull, u.FreeBytes)
		}
		s.full.CompareAndSwap(p, nil)
	}
	if u.FreeBytes < minFree {
		return fmt.Errorf("%w: %d bytes free, %d wanted", ErrFull, u.FreeBytes, minFree)
	}
	return s.Room(minFree)
}

// usageMaxAge is how old the measured usage may get before a background
// walk of the spool refreshes it.
const usageMaxAge = 2 * time.Second

// Room reports ErrFull when a message of need bytes would take the spool
// within 5 % of MaxBytes. Past an emptyDir's sizeLimit the kubelet evicts
// the pod at once, spool and all, where a full disk only fails writes:
// the relay must stop taking mail before. It uses the last measurement
// (usage), so it costs no system call.
func (s *Spool) Room(need int64) error {
	if s.maxBytes <= 0 {
		return nil
	}
	if used := s.usage() + s.inflight.Load(); used+need+s.maxBytes/20 > s.maxBytes {
		return fmt.Errorf("%w: the spool's files take %d bytes of spool.max_bytes %d", ErrFull, used, s.maxBytes)
	}
	return nil
}

// counted adds a commit's bytes to the usage until the next walk.
func (s *Spool) counted(n int64) {
	s.committed.Add(n)
	s.used.Add(n)
}

// usage is the bytes the spool's files take: the last walk plus the
// commits since. A figure older than usageMaxAge starts a new walk in the
// background; callers go on with the old one meanwhile.
func (s *Spool) usage() int64 {
	if time.Since(time.Unix(0, s.usedAt.Load())) > usageMaxAge && s.measuring.CompareAndSwap(false, true) {
		go func() {
			defer s.measuring.Store(false)
			s.measure()
		}()
	}
	return s.used.Load()
}

// measure walks the spool and its dead letters as du would: the pool's
// free files and .broken ones take room too.
func (s *Spool) measure() {
	// Commits during the walk may or may not be in it: count them again
	// rather than not at all.
	before := s.committed.Load()
	var n int64
	for _, dir := range []string{s.dir, s.dead} {
		ents, err := s.fs.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				continue
			}
			if fi, err := e.Info(); err == nil {
				n += diskBytes(fi)
			}
		}
	}
	s.used.Store(n + s.committed.Load() - before)
	s.usedAt.Store(time.Now().UnixNano())
}

// noteFull remembers a write that failed for lack of space, for Writable.
func (s *Spool) noteFull(err error) {
	if !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EDQUOT) {
		return
	}
	s.drainPool()
	free := int64(0)
	if u, serr := s.fs.Statfs(s.dir); serr == nil {
		free = u.FreeBytes
	}
	s.full.Store(&free)
}
