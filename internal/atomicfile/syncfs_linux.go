package atomicfile

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// syncFS makes every write and rename on d's file system durable with one
// syncfs(2), the primitive behind the spool's group commit. Since Linux 5.8
// it reports writeback errors of that file system.
func syncFS(d *os.File) error {
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", d.Name(), err)
	}
	return nil
}
