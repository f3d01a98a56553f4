//go:build !linux

package spool

import (
	"errors"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// OpenFile is os.OpenFile.
func (OS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// SyncFS falls back to sync(2) where syncfs(2) does not exist; production
// is Linux, this keeps development builds correct.
func (OS) SyncFS(string) error {
	syscall.Sync()
	return nil
}

// Statfs is statfs(2) of dir's file system.
func (OS) Statfs(dir string) (Usage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Usage{}, err
	}
	return Usage{FreeBytes: int64(st.Bavail) * int64(st.Bsize), FreeInodes: int64(st.Ffree)}, nil
}

// RenameNoReplace is not attempted here: Spool.renameNoReplace falls back
// to a checked rename.
func (OS) RenameNoReplace(oldpath, newpath string) error {
	return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: errors.ErrUnsupported}
}

// diskBytes is what fi takes on disk, as near as the size says.
func diskBytes(fi fs.FileInfo) int64 { return fi.Size() }
