package testwait

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Tmpfs mounts a tmpfs of the given size (mount's syntax: "600k", "4m")
// on a fresh directory, unmounted when the test ends, or skips the test
// where mounting is not allowed (not root, no CAP_SYS_ADMIN): a real full
// disk, not a simulated one.
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput()
	if err != nil {
		SkipUnprivileged(t, "cannot mount a tmpfs here (%v: %s)", err, strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dir, err, out)
		}
	})
	return dir
}

// RequirePrivilegedEnv, when set (make test sets it for root), turns the
// skips of tests that need root into failures: on a machine that can run
// them, a full disk or a memory limit that silently went untested would
// leave a guarantee unchecked.
const RequirePrivilegedEnv = "RELAYCAR_REQUIRE_PRIVILEGED"

// SkipUnprivileged skips t for a reason only privilege would remove, or
// fails it where RequirePrivilegedEnv says the machine is privileged.
func SkipUnprivileged(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv(RequirePrivilegedEnv) != "" {
		t.Fatalf(format+" ("+RequirePrivilegedEnv+" is set: this machine must run it)", args...)
	}
	t.Skipf(format, args...)
}
