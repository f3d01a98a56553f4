package spool

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// crashFS is an in-memory file system that knows what is durable, in the
// spirit of RocksDB's FaultInjectionTestFS: every file has durable and
// volatile contents, every directory durable and volatile entries. File
// data becomes durable on fsync of the file or syncfs; creates, renames
// and unlinks only on syncfs (fsync of a file does not make its name
// durable). After crashAt mutating operations the power fails: that
// operation and every later call fail, and survivor() builds the disk a
// reboot would find.
type crashFS struct {
	mu      sync.Mutex
	inodes  []*inode
	dirs    map[string]bool
	live    map[string]map[string]int // dir → name → inode
	durable map[string]map[string]int
	// meta are the creates, renames and unlinks since the last syncfs.
	meta    []metaOp
	ops     int
	crashAt int // -1: never
	crashed bool
	log     []string
}

type inode struct {
	data, durable []byte
	// writes since data was last durable, for torn survivors.
	writes []pwrite
}

type pwrite struct {
	off   int64
	b     []byte
	trunc bool
}

type metaOp struct {
	fromDir, from, toDir, to string // from == "": create; to == "": unlink
	ino                      int
}

var errPowerLost = errors.New("crashfs: power lost")

func newCrashFS(dirs ...string) *crashFS {
	c := &crashFS{dirs: map[string]bool{}, live: map[string]map[string]int{}, durable: map[string]map[string]int{}, crashAt: -1}
	for _, d := range dirs {
		c.mkdir(d)
	}
	return c
}

func (c *crashFS) mkdir(d string) {
	for ; d != "." && d != "/" && !c.dirs[d]; d = filepath.Dir(d) {
		c.dirs[d] = true
		c.live[d], c.durable[d] = map[string]int{}, map[string]int{}
	}
}

// step counts a mutating operation and fails it once the power is gone.
func (c *crashFS) step(format string, args ...any) error {
	if c.crashed {
		return errPowerLost
	}
	if c.ops == c.crashAt {
		c.crashed = true
		return errPowerLost
	}
	c.ops++
	c.log = append(c.log, fmt.Sprintf(format, args...))
	return nil
}

func (c *crashFS) Crashed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.crashed
}

func (c *crashFS) lookup(path string) (dir, name string, ino int, ok bool) {
	dir, name = filepath.Dir(path), filepath.Base(path)
	ino, ok = c.live[dir][name]
	return
}

func pathErr(op, path string, err error) error { return &fs.PathError{Op: op, Path: path, Err: err} }

func (c *crashFS) OpenFile(path string, flag int, perm fs.FileMode) (File, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return nil, errPowerLost
	}
	dir, name, ino, ok := c.lookup(path)
	if !c.dirs[dir] {
		return nil, pathErr("open", path, fs.ErrNotExist)
	}
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, pathErr("open", path, fs.ErrExist)
	case !ok && flag&os.O_CREATE == 0:
		return nil, pathErr("open", path, fs.ErrNotExist)
	case !ok:
		if err := c.step("create %s", path); err != nil {
			return nil, err
		}
		ino = len(c.inodes)
		c.inodes = append(c.inodes, &inode{})
		c.live[dir][name] = ino
		c.meta = append(c.meta, metaOp{toDir: dir, to: name, ino: ino})
	case flag&os.O_TRUNC != 0:
		if err := c.step("truncate %s", path); err != nil {
			return nil, err
		}
		n := c.inodes[ino]
		n.data = nil
		n.writes = append(n.writes, pwrite{trunc: true})
	}
	return &crashFile{c: c, ino: ino, name: path}, nil
}

func (c *crashFS) Rename(from, to string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return errPowerLost
	}
	fd, fn, ino, ok := c.lookup(from)
	td, tn := filepath.Dir(to), filepath.Base(to)
	if !ok || !c.dirs[td] {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: fs.ErrNotExist}
	}
	if err := c.step("rename %s %s", from, to); err != nil {
		return err
	}
	delete(c.live[fd], fn)
	c.live[td][tn] = ino
	c.meta = append(c.meta, metaOp{fromDir: fd, from: fn, toDir: td, to: tn, ino: ino})
	return nil
}

func (c *crashFS) RenameNoReplace(from, to string) error {
	c.mu.Lock()
	_, _, _, exists := c.lookup(to)
	c.mu.Unlock()
	if exists {
		return &os.LinkError{Op: "renameat2", Old: from, New: to, Err: fs.ErrExist}
	}
	return c.Rename(from, to)
}

func (c *crashFS) Remove(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return errPowerLost
	}
	dir, name, ino, ok := c.lookup(path)
	if !ok {
		return pathErr("remove", path, fs.ErrNotExist)
	}
	if err := c.step("unlink %s", path); err != nil {
		return err
	}
	delete(c.live[dir], name)
	c.meta = append(c.meta, metaOp{fromDir: dir, from: name, ino: ino})
	return nil
}

func (c *crashFS) ReadDir(dir string) ([]fs.DirEntry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return nil, errPowerLost
	}
	if !c.dirs[dir] {
		return nil, pathErr("readdir", dir, fs.ErrNotExist)
	}
	var out []fs.DirEntry
	for name, ino := range c.live[dir] {
		out = append(out, fs.FileInfoToDirEntry(fileInfo{name: name, size: int64(len(c.inodes[ino].data))}))
	}
	for d := range c.dirs {
		if filepath.Dir(d) == dir && d != dir {
			out = append(out, fs.FileInfoToDirEntry(fileInfo{name: filepath.Base(d), dir: true}))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out, nil
}

// MkdirAll is durable at once: the spool's directories exist before the
// workloads start.
func (c *crashFS) MkdirAll(path string, perm fs.FileMode) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return errPowerLost
	}
	c.mkdir(path)
	return nil
}

func (c *crashFS) SyncFS(string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.step("syncfs"); err != nil {
		return err
	}
	for _, n := range c.inodes {
		n.durable, n.writes = slices.Clone(n.data), nil
	}
	for _, m := range c.meta {
		m.apply(c.durable)
	}
	c.meta = nil
	return nil
}

func (c *crashFS) Statfs(string) (Usage, error) {
	return Usage{FreeBytes: 1 << 40, FreeInodes: -1}, nil
}

func (m metaOp) apply(dirs map[string]map[string]int) {
	if m.from != "" {
		delete(dirs[m.fromDir], m.from)
	}
	if m.to != "" {
		dirs[m.toDir][m.to] = m.ino
	}
}

// survivor is the disk after the power failed, in one of the ways a real
// one can come back.
type survivor int

const (
	lostAll     survivor = iota // only what was synced
	keptAll                     // the kernel had written everything back
	namesOnly                   // entries written back, data not: empty and stale files
	dataOnly                    // data written back, entries not
	tornHalf                    // half of the pending entries and writes, the last write torn
	unlinksOnly                 // unlinks written back, creates and renames not (no journal)
	zeroFirst                   // all written back but each file's first pending write, which reads as zeros (size kept, block not)
	nSurvivors
)

func (v survivor) String() string {
	return [...]string{"lost-all", "kept-all", "names-only", "data-only", "torn-half", "unlinks-only", "zero-first-write"}[v]
}

// reboot returns the disk a restart finds after a power failure, as a
// fresh crashFS whose contents are all durable.
func (c *crashFS) reboot(v survivor) *crashFS {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := &crashFS{dirs: maps.Clone(c.dirs), live: map[string]map[string]int{}, durable: map[string]map[string]int{}, crashAt: -1}
	names := map[string]map[string]int{}
	for d, ents := range c.durable {
		names[d] = maps.Clone(ents)
	}
	switch v {
	case keptAll, namesOnly, zeroFirst:
		for _, m := range c.meta {
			m.apply(names)
		}
	case tornHalf:
		for _, m := range c.meta[:(len(c.meta)+1)/2] {
			m.apply(names)
		}
	case unlinksOnly:
		for _, m := range c.meta {
			if m.to == "" {
				m.apply(names)
			}
		}
	}
	for _, ino := range c.inodes {
		var data []byte
		switch v {
		case keptAll, dataOnly:
			data = ino.data
		case tornHalf:
			data = slices.Clone(ino.durable)
			k := (len(ino.writes) + 1) / 2
			for i, w := range ino.writes[:k] {
				b := w.b
				if i == k-1 {
					b = b[:len(b)/2]
				}
				data = w.applyTo(data, b)
			}
		case zeroFirst:
			data = slices.Clone(ino.durable)
			for i, w := range ino.writes {
				b := w.b
				if i == 0 {
					b = make([]byte, len(w.b))
				}
				data = w.applyTo(data, b)
			}
		default:
			data = ino.durable
		}
		n.inodes = append(n.inodes, &inode{data: slices.Clone(data), durable: slices.Clone(data)})
	}
	for d := range n.dirs {
		n.live[d], n.durable[d] = maps.Clone(names[d]), maps.Clone(names[d])
		if n.live[d] == nil {
			n.live[d], n.durable[d] = map[string]int{}, map[string]int{}
		}
	}
	return n
}

func (w pwrite) applyTo(data, b []byte) []byte {
	if w.trunc {
		return nil
	}
	if end := w.off + int64(len(b)); end > int64(len(data)) {
		data = append(data, make([]byte, end-int64(len(data)))...)
	}
	copy(data[w.off:], b)
	return data
}

// seed writes a durable file, as a previous release left it.
func (c *crashFS) seed(path string, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	dir, name := filepath.Dir(path), filepath.Base(path)
	c.mkdir(dir)
	c.inodes = append(c.inodes, &inode{data: slices.Clone(data), durable: slices.Clone(data)})
	c.live[dir][name] = len(c.inodes) - 1
	c.durable[dir][name] = len(c.inodes) - 1
}

// names lists a directory's files, for assertions.
func (c *crashFS) names(dir string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Sorted(maps.Keys(c.live[dir]))
}

type crashFile struct {
	c      *crashFS
	ino    int
	name   string
	pos    int64
	closed bool
}

func (f *crashFile) node() *inode { return f.c.inodes[f.ino] }

func (f *crashFile) ReadAt(b []byte, off int64) (int, error) {
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	if f.c.crashed {
		return 0, errPowerLost
	}
	data := f.node().data
	if off >= int64(len(data)) {
		return 0, io.EOF
	}
	n := copy(b, data[off:])
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func (f *crashFile) Read(b []byte) (int, error) {
	n, err := f.ReadAt(b, f.pos)
	f.pos += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

func (f *crashFile) WriteAt(b []byte, off int64) (int, error) {
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	if err := f.c.step("write %s @%d+%d", f.name, off, len(b)); err != nil {
		return 0, err
	}
	n := f.node()
	w := pwrite{off: off, b: slices.Clone(b)}
	n.data = w.applyTo(n.data, w.b)
	n.writes = append(n.writes, w)
	return len(b), nil
}

func (f *crashFile) Write(b []byte) (int, error) {
	n, err := f.WriteAt(b, f.pos)
	f.pos += int64(n)
	return n, err
}

func (f *crashFile) Sync() error {
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	if err := f.c.step("fsync %s", f.name); err != nil {
		return err
	}
	n := f.node()
	n.durable, n.writes = slices.Clone(n.data), nil
	return nil
}

func (f *crashFile) Stat() (fs.FileInfo, error) {
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	if f.c.crashed {
		return nil, errPowerLost
	}
	return fileInfo{name: filepath.Base(f.name), size: int64(len(f.node().data))}, nil
}

func (f *crashFile) Close() error {
	f.closed = true
	return nil
}

type fileInfo struct {
	name string
	size int64
	dir  bool
}

func (i fileInfo) Name() string { return i.name }
func (i fileInfo) Size() int64  { return i.size }
func (i fileInfo) Mode() fs.FileMode {
	if i.dir {
		return fs.ModeDir | dirMode
	}
	return fileMode
}
func (i fileInfo) ModTime() time.Time { return time.Time{} }
func (i fileInfo) IsDir() bool        { return i.dir }
func (i fileInfo) Sys() any           { return nil }

var _ FS = (*crashFS)(nil)

// describe is the op log around the crash, for failure messages.
func (c *crashFS) describe(k int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	lo := max(0, k-3)
	return strings.Join(c.log[lo:min(k+1, len(c.log))], "; ")
}
