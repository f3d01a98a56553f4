package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testwait"
)

// cgroupV1Memory is where the cgroup v1 memory controller is mounted.
const cgroupV1Memory = "/sys/fs/cgroup/memory"

// memCgroup is a fresh cgroup v1 memory cgroup with a hard limit, for
// proving that relaycar stays inside a container's memory limit: the kernel
// OOM-kills whatever in it goes past the limit, as it would in a pod.
//
// Put the process in before it allocates: wrap an exec.Cmd before Start
// (it then joins the cgroup and execs the real binary, same PID), or add a
// started PID. The cgroup is removed when the test ends, after the
// harness has stopped its process (cleanups run last-registered first),
// killing anything still in it.
type memCgroup struct {
	t     *testing.T
	dir   string
	limit int64
	memsw bool // memory.memsw.limit_in_bytes was set too, so swap cannot hide the limit
}

// cgroupStats is what the kernel accounted for the cgroup.
type cgroupStats struct {
	Limit int64
	// OOMKills is memory.oom_control's oom_kill counter: processes the
	// kernel killed for this cgroup's limit. OOMKillReported is false on
	// kernels without that line (before 4.13); a SIGKILLed process is then
	// the only sign.
	OOMKills        int64
	OOMKillReported bool
	// FailCnt counts charges that hit the limit (reclaim, maybe OOM). On
	// the 6.18 kernel here it stays 0 once memsw is limited too, even at
	// an OOM kill, so it is no OOM signal; oom_kill is.
	FailCnt int64
	// PeakBytes is memory.max_usage_in_bytes: the high-water mark,
	// including page cache charged to the cgroup (spool files written by
	// the process count until the kernel reclaims them).
	PeakBytes  int64
	UsageBytes int64
}

func (s cgroupStats) String() string {
	oom := strconv.FormatInt(s.OOMKills, 10)
	if !s.OOMKillReported {
		oom = "not reported"
	}
	return fmt.Sprintf("limit %d MiB, peak %.1f MiB, now %.1f MiB, failcnt %d, oom_kill %s",
		s.Limit>>20, float64(s.PeakBytes)/(1<<20), float64(s.UsageBytes)/(1<<20), s.FailCnt, oom)
}

// newMemCgroup creates the cgroup or skips the test saying why it cannot.
func newMemCgroup(t *testing.T, limit int64) *memCgroup {
	t.Helper()
	if os.Geteuid() != 0 {
		testwait.SkipUnprivileged(t, "memory cgroup: not root")
	}
	if st, err := os.Stat(filepath.Join(cgroupV1Memory, "cgroup.procs")); err != nil || st.IsDir() {
		testwait.SkipUnprivileged(t, "memory cgroup: no cgroup v1 memory controller at %s", cgroupV1Memory)
	}
	dir := filepath.Join(cgroupV1Memory, fmt.Sprintf("relaycar-test-%016x", rand.Uint64()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		testwait.SkipUnprivileged(t, "memory cgroup: %s not writable: %v", cgroupV1Memory, err)
	}
	c := &memCgroup{t: t, dir: dir, limit: limit}
	t.Cleanup(c.remove)
	// limit_in_bytes first: memsw may never be below it.
	if err := c.write("memory.limit_in_bytes", limit); err != nil {
		testwait.SkipUnprivileged(t, "memory cgroup: cannot set a limit: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "memory.memsw.limit_in_bytes")); err == nil {
		if err := c.write("memory.memsw.limit_in_bytes", limit); err != nil {
			t.Fatalf("memory cgroup: %v", err)
		}
		c.memsw = true
	}
	return c
}

func (c *memCgroup) write(file string, v int64) error {
	return os.WriteFile(filepath.Join(c.dir, file), []byte(strconv.FormatInt(v, 10)), 0o644)
}

// wrap makes cmd join the cgroup before the program starts: it runs a
// shell that writes its own PID to cgroup.procs and then execs the real
// program, keeping the PID, Pdeathsig and the signals the test sends. Call
// it before cmd.Start; if the PID cannot be written the command fails
// instead of running unlimited.
func (c *memCgroup) wrap(cmd *exec.Cmd) {
	args := append([]string{"sh", "-c", `echo $$ > "$0" && exec "$@"`, filepath.Join(c.dir, "cgroup.procs"), cmd.Path}, cmd.Args[1:]...)
	cmd.Path, cmd.Args = "/bin/sh", args
}

// add moves a started process into the cgroup.
func (c *memCgroup) add(pid int) error {
	return os.WriteFile(filepath.Join(c.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
}

// stats reads the kernel's accounting now.
func (c *memCgroup) stats() cgroupStats {
	s := cgroupStats{Limit: c.limit}
	s.FailCnt = c.readInt("memory.failcnt")
	s.PeakBytes = c.readInt("memory.max_usage_in_bytes")
	s.UsageBytes = c.readInt("memory.usage_in_bytes")
	b, _ := os.ReadFile(filepath.Join(c.dir, "memory.oom_control"))
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "oom_kill "); ok {
			s.OOMKills, _ = strconv.ParseInt(v, 10, 64)
			s.OOMKillReported = true
		}
	}
	return s
}

func (c *memCgroup) readInt(file string) int64 {
	b, err := os.ReadFile(filepath.Join(c.dir, file))
	if err != nil {
		return -1
	}
	v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return v
}

// pids lists the processes in the cgroup.
func (c *memCgroup) pids() []int {
	b, _ := os.ReadFile(filepath.Join(c.dir, "cgroup.procs"))
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// remove kills what is left in the cgroup (only this test's processes can
// be in it) and removes it; rmdir fails with EBUSY until the last one has
// been reaped, so it retries briefly.
func (c *memCgroup) remove() {
	c.t.Logf("memory cgroup %s: %v", filepath.Base(c.dir), c.stats())
	for _, pid := range c.pids() {
		c.t.Logf("memory cgroup: killing leftover process %d", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(c.dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			c.t.Errorf("memory cgroup: %s not removed: %v (processes %v)", c.dir, err, c.pids())
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runInCgroup runs a command to completion inside c, killed after timeout.
func runInCgroup(t *testing.T, c *memCgroup, timeout time.Duration, stdin string, name string, args ...string) (*os.ProcessState, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	c.wrap(cmd)
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish within %s", name, timeout)
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("%s: %v", name, err)
	}
	return cmd.ProcessState, out.String()
}

// killedBy reports whether the process died of sig.
func killedBy(ps *os.ProcessState, sig syscall.Signal) bool {
	ws, ok := ps.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// TestCgroupHelper proves the helper: dd's buffer is allocated and filled
// at once, so bs= sets how much memory the process touches.
func TestCgroupHelper(t *testing.T) {
	dd, err := exec.LookPath("dd")
	if err != nil {
		t.Skip("no dd")
	}
	const limit = 64 << 20

	t.Run("past the limit is OOM-killed", func(t *testing.T) {
		c := newMemCgroup(t, limit)
		ps, out := runInCgroup(t, c, 30*time.Second, "", dd, "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1")
		s := c.stats()
		t.Logf("%v; memsw limited: %v; exit: %v", s, c.memsw, ps)
		if !killedBy(ps, syscall.SIGKILL) {
			t.Fatalf("dd bs=128M in a 64 MiB cgroup was not killed: %v\n%s", ps, out)
		}
		if s.OOMKillReported && s.OOMKills < 1 {
			t.Fatalf("process was SIGKILLed but oom_kill = %d", s.OOMKills)
		}
		if s.PeakBytes > limit {
			t.Fatalf("peak %d above the limit %d", s.PeakBytes, limit)
		}
	})

	t.Run("below the limit is not", func(t *testing.T) {
		c := newMemCgroup(t, limit)
		ps, out := runInCgroup(t, c, 30*time.Second, "", dd, "if=/dev/zero", "of=/dev/null", "bs=32M", "count=2")
		s := c.stats()
		t.Logf("%v; exit: %v", s, ps)
		if !ps.Success() {
			t.Fatalf("dd bs=32M in a 64 MiB cgroup failed: %v\n%s", ps, out)
		}
		if s.OOMKills != 0 {
			t.Fatalf("oom_kill = %d, want 0", s.OOMKills)
		}
		// The buffer was charged here, so dd ran inside from its start.
		if s.PeakBytes < 32<<20 {
			t.Fatalf("peak %d below the 32 MiB buffer: process not accounted to the cgroup", s.PeakBytes)
		}
	})

	t.Run("add a started process", func(t *testing.T) {
		c := newMemCgroup(t, limit)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// The shell waits for a line before it allocates, so it can be
		// moved first.
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `read x && exec "$0" if=/dev/zero of=/dev/null bs=32M count=1`, dd)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if err := c.add(cmd.Process.Pid); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal(err)
		}
		stdin.Write([]byte("go\n"))
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Fatalf("dd: %v", err)
		}
		if s := c.stats(); s.PeakBytes < 32<<20 || s.OOMKills != 0 {
			t.Fatalf("after add: %v", s)
		}
	})
}
