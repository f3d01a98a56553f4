package spool

import (
	"io"
	"io/fs"
	"os"
)

// FS is every file-system operation the spool makes, so that tests can
// fail a write (a full disk) or lose power after any operation.
type FS interface {
	OpenFile(name string, flag int, perm fs.FileMode) (File, error)
	Rename(oldpath, newpath string) error
	// RenameNoReplace fails with fs.ErrExist when newpath exists, and
	// with errors.ErrUnsupported where the file system cannot do it.
	RenameNoReplace(oldpath, newpath string) error
	Remove(name string) error
	// ReadDir lists a directory sorted by name.
	ReadDir(name string) ([]fs.DirEntry, error)
	MkdirAll(path string, perm fs.FileMode) error
	// SyncFS makes everything written on dir's file system durable:
	// file data and directory entries alike (syncfs(2)).
	SyncFS(dir string) error
	Statfs(dir string) (Usage, error)
}

// File is the part of *os.File the spool uses.
type File interface {
	io.Reader
	io.ReaderAt
	io.Writer
	io.WriterAt
	io.Closer
	// Sync makes this file's data durable (fsync(2)); its name in a
	// directory is not.
	Sync() error
	Stat() (fs.FileInfo, error)
}

// dataSyncer is a File that can make its data durable without its
// metadata (fdatasync(2)): a write over blocks a file already has then
// waits for no journal commit, which is most of what an fsync or syncfs
// costs on a journaled file system.
type dataSyncer interface{ Datasync() error }

// datasync is fdatasync where the File has it, else fsync.
func datasync(f File) error {
	if d, ok := f.(dataSyncer); ok {
		return d.Datasync()
	}
	return f.Sync()
}

// Usage is the part of statfs(2) that readiness looks at.
type Usage struct {
	TotalBytes int64 // size of the file system; 0 if unknown
	FreeBytes  int64 // available to unprivileged writers
	FreeInodes int64 // -1 where the file system has no fixed count
	ReadOnly   bool
}

// OS is the real file system.
type OS struct{}

var _ FS = OS{}

// Rename is os.Rename.
func (OS) Rename(oldpath, newpath string) error { return os.Rename(oldpath, newpath) }

// Remove is os.Remove.
func (OS) Remove(name string) error { return os.Remove(name) }

// ReadDir is os.ReadDir.
func (OS) ReadDir(name string) ([]fs.DirEntry, error) { return os.ReadDir(name) }

// MkdirAll is os.MkdirAll.
func (OS) MkdirAll(path string, perm fs.FileMode) error { return os.MkdirAll(path, perm) }
