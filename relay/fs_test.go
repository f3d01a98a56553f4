package relay

import (
	"io/fs"
	"os"
	"sort"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/relaycar/relaycar/relay/spool"
)

// switchFS is the real file system, failing every write like a full disk
// while full is set; tests flip it while the relay runs.
type switchFS struct {
	spool.OS
	full atomic.Bool
}

func (s *switchFS) OpenFile(name string, flag int, perm fs.FileMode) (spool.File, error) {
	f, err := s.OS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &switchFile{File: f, fs: s}, nil
}

type switchFile struct {
	spool.File
	fs *switchFS
}

func (f *switchFile) Write(b []byte) (int, error) {
	if f.fs.full.Load() {
		return 0, &os.PathError{Op: "write", Err: syscall.ENOSPC}
	}
	return f.File.Write(b)
}

func (f *switchFile) WriteAt(b []byte, off int64) (int, error) {
	if f.fs.full.Load() {
		return 0, &os.PathError{Op: "write", Err: syscall.ENOSPC}
	}
	return f.File.WriteAt(b, off)
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}
