package spool

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// OpenFile is open(2) and os.NewFile. os.OpenFile would first try to add
// the descriptor to the network poller, which a regular file refuses
// (four fcntl and an epoll_ctl that fails with EPERM), on each of the two
// or three opens a message costs the spool.
func (OS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	for {
		fd, err := unix.Open(name, flag|unix.O_CLOEXEC, uint32(perm.Perm()))
		switch {
		case err == nil:
			return osFile{os.NewFile(uintptr(fd), name)}, nil
		case err != unix.EINTR:
			return nil, &fs.PathError{Op: "open", Path: name, Err: err}
		}
	}
}

// osFile adds fdatasync(2) to *os.File.
type osFile struct{ *os.File }

// Datasync is fdatasync(2): the data and the size, not the times.
func (f osFile) Datasync() error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for serr = unix.Fdatasync(int(fd)); serr == unix.EINTR; serr = unix.Fdatasync(int(fd)) {
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &fs.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}

// SyncFS is syncfs(2) of dir's file system. The spool's own commits use a
// shared atomicfile.GroupSync instead; this serves wrappers of OS.
func (OS) SyncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// Statfs is statfs(2) of dir's file system.
func (OS) Statfs(dir string) (Usage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Usage{}, err
	}
	u := Usage{TotalBytes: int64(st.Blocks) * int64(st.Bsize), FreeBytes: int64(st.Bavail) * int64(st.Bsize), FreeInodes: int64(st.Ffree), ReadOnly: st.Flags&unix.ST_RDONLY != 0}
	if st.Files == 0 {
		u.FreeInodes = -1
	}
	return u, nil
}

// RenameNoReplace is renameat2(2) with RENAME_NOREPLACE.
func (OS) RenameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS):
		err = fmt.Errorf("%w: %w", errors.ErrUnsupported, err)
	}
	return &os.LinkError{Op: "renameat2", Old: oldpath, New: newpath, Err: err}
}

// diskBytes is what fi takes on disk, as du and the kubelet count it.
func diskBytes(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
