//go:build !linux

package atomicfile

import (
	"os"
	"syscall"
)

// syncFS falls back to sync(2) where syncfs(2) does not exist; relaycar's
// production target is Linux, this keeps development builds correct.
func syncFS(*os.File) error {
	syscall.Sync()
	return nil
}
