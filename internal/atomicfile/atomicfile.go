// Package atomicfile writes files so that a reader (or a restart after a
// crash) sees either the old content or the complete new content, never a
// torn write.
package atomicfile

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// TempPrefix marks in-progress files; directory scanners skip names with it.
const TempPrefix = ".tmp-"

// FS is the seam for the few file operations the writers need, so tests can
// simulate a full disk without filling one.
type FS interface {
	CreateTemp(dir, pattern string) (File, error)
	// Create makes a new file that must not exist yet (O_EXCL).
	Create(path string, perm os.FileMode) (File, error)
}

// File is the subset of *os.File a writer uses.
type File interface {
	io.Writer
	Name() string
	Sync() error
	Close() error
	Chmod(mode os.FileMode) error
}

// OS is the real file system.
type OS struct{}

// CreateTemp creates a temp file in dir.
func (OS) CreateTemp(dir, pattern string) (File, error) { return os.CreateTemp(dir, pattern) }

// Create makes a new file, failing if it exists.
func (OS) Create(path string, perm os.FileMode) (File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
}

// WriteTemp copies r into a new fsynced temp file in dir (same directory
// as the final name, or Rename would not be atomic) and returns its path.
// On error nothing is left behind.
func WriteTemp(fsys FS, dir string, r io.Reader, perm os.FileMode) (string, error) {
	if fsys == nil {
		fsys = OS{}
	}
	f, err := fsys.CreateTemp(dir, TempPrefix+"*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(name)
		return "", err
	}
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if _, err := io.Copy(f, r); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return "", err
	}
	return name, nil
}

// WriteFile writes r to path atomically: fsynced temp file, rename, and an
// fsync of the directory so the rename itself survives a power loss.
func WriteFile(fsys FS, path string, r io.Reader, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := WriteTemp(fsys, dir, r, perm)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making renames and unlinks in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
