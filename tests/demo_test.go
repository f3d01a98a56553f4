package tests

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The failover demo in the README must keep working: primary down mid-stream,
// messages to the backup, primary back, nothing lost.
func TestFailoverDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about 20s")
	}
	t.Parallel()
	demo := filepath.Join(t.TempDir(), "failover-demo")
	build := exec.Command("go", "build", "-o", demo, "./examples/failover-demo")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, demo)
	cmd.Dir = ".."
	// In a process group of its own, so that a timeout or the end of the
	// test stops the relay the demo started too, not only the demo.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	t.Cleanup(func() {
		if cmd.Process != nil {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	})
	out, err := cmd.CombinedOutput()
	text := string(out)
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, text)
	}
	m := regexp.MustCompile(`accepted (\d+), delivered via primary (\d+), via backup (\d+)`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no summary line:\n%s", text)
	}
	accepted, _ := strconv.Atoi(m[1])
	primary, _ := strconv.Atoi(m[2])
	backup, _ := strconv.Atoi(m[3])
	if accepted != 60 || primary == 0 || backup == 0 || primary+backup != accepted {
		t.Errorf("accepted %d, primary %d, backup %d", accepted, primary, backup)
	}
	for _, want := range []string{"lost: 0, delivered twice: 0", "circuit breaker open", "circuit breaker closed", "breaker state now: closed"} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
}
