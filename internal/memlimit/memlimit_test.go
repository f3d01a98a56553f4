package memlimit

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"

	"github.com/relaycar/relaycar/internal/testwait"
)

// Mount lines as this machine and common container runtimes write them.
const (
	mountV1     = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
	mountV1Dckr = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory\n"
	mountV2     = "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
	mountHybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
	mountCPU    = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"

	v1Unlimited4K  = "9223372036854771712"
	v1Unlimited64K = "9223372036854710272"
)

// writeTree creates files (path → content) under a fresh root.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(p, "/") {
			continue
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestContainerLimit(t *testing.T) {
	const mem = "/sys/fs/cgroup/memory"
	tests := []struct {
		name    string
		files   map[string]string
		want    int64
		source  string // substring of the source
		wantErr bool
	}{
		{name: "v1 limit in own cgroup", files: map[string]string{
			"proc/self/cgroup":                           "8:pids:/\n4:memory:/process_api/x\n0::/\n",
			"proc/self/mountinfo":                        mountCPU + mountV1 + mountHybrid,
			mem + "/process_api/x/memory.limit_in_bytes": "536870912\n",
			mem + "/process_api/x/memory.stat":           "cache 0\nhierarchical_memory_limit 536870912\n",
			mem + "/memory.limit_in_bytes":               v1Unlimited4K,
		}, want: 512 << 20, source: "cgroup v1 " + mem + "/process_api/x/memory.limit_in_bytes"},
		{name: "v1 unlimited (4K pages)", files: map[string]string{
			"proc/self/cgroup":                           "4:memory:/process_api/x\n",
			"proc/self/mountinfo":                        mountV1,
			mem + "/process_api/x/memory.limit_in_bytes": v1Unlimited4K + "\n",
			mem + "/process_api/x/memory.stat":           "hierarchical_memory_limit " + v1Unlimited4K + "\n",
		}, want: 0, source: "unlimited"},
		{name: "v1 unlimited (64K pages)", files: map[string]string{
			"proc/self/cgroup":             "4:memory:/\n",
			"proc/self/mountinfo":          mountV1,
			mem + "/memory.limit_in_bytes": v1Unlimited64K,
		}, want: 0, source: "unlimited"},
		{name: "v1 parent limit via hierarchical_memory_limit", files: map[string]string{
			"proc/self/cgroup":                               "4:memory:/kubepods/pod1/ctr\n",
			"proc/self/mountinfo":                            mountV1,
			mem + "/kubepods/pod1/ctr/memory.limit_in_bytes": v1Unlimited4K,
			mem + "/kubepods/pod1/ctr/memory.stat":           "rss 1\nhierarchical_memory_limit 268435456\nhierarchical_memsw_limit 1\n",
		}, want: 256 << 20, source: "hierarchical_memory_limit"},
		{name: "v1 docker without cgroupns: mount root is the container's cgroup", files: map[string]string{
			"proc/self/cgroup":             "4:memory:/docker/abc\n",
			"proc/self/mountinfo":          mountV1Dckr,
			mem + "/memory.limit_in_bytes": "1073741824",
		}, want: 1 << 30, source: mem + "/memory.limit_in_bytes"},
		{name: "v1 path not in this mount namespace falls back to the mount point", files: map[string]string{
			"proc/self/cgroup":             "4:memory:/elsewhere/abc\n",
			"proc/self/mountinfo":          mountV1,
			mem + "/memory.limit_in_bytes": "104857600",
		}, want: 100 << 20},
		{name: "v1 without mountinfo uses the usual mount point", files: map[string]string{
			"proc/self/cgroup":               "4:memory:/a\n",
			mem + "/a/memory.limit_in_bytes": "209715200",
		}, want: 200 << 20},
		{name: "v1 malformed", files: map[string]string{
			"proc/self/cgroup":             "4:memory:/\n",
			"proc/self/mountinfo":          mountV1,
			mem + "/memory.limit_in_bytes": "lots",
		}, wantErr: true},
		{name: "v2 limit", files: map[string]string{
			"proc/self/cgroup":                 "0::/\n",
			"proc/self/mountinfo":              mountV2,
			"sys/fs/cgroup/memory.max":         "536870912\n",
			"sys/fs/cgroup/cgroup.controllers": "memory pids\n",
		}, want: 512 << 20, source: "cgroup v2 /sys/fs/cgroup/memory.max"},
		{name: "v2 max", files: map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"proc/self/mountinfo":      mountV2,
			"sys/fs/cgroup/memory.max": "max\n",
		}, want: 0, source: "max"},
		{name: "v2 parent limit binds the child", files: map[string]string{
			"proc/self/cgroup":                           "0::/kubepods/pod1/ctr\n",
			"proc/self/mountinfo":                        mountV2,
			"sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max",
			"sys/fs/cgroup/kubepods/pod1/memory.max":     "805306368",
			"sys/fs/cgroup/kubepods/memory.max":          "2147483648",
		}, want: 768 << 20, source: "/sys/fs/cgroup/kubepods/pod1/memory.max"},
		{name: "v2 root cgroup has no memory.max", files: map[string]string{
			"proc/self/cgroup":    "0::/\n",
			"proc/self/mountinfo": mountV2,
			"sys/fs/cgroup/":      "",
		}, want: 0},
		{name: "v2 malformed", files: map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"proc/self/mountinfo":      mountV2,
			"sys/fs/cgroup/memory.max": "12x",
		}, wantErr: true},
		{name: "hybrid: memory on v1 wins over the unified tree", files: map[string]string{
			"proc/self/cgroup":                 "4:memory:/\n0::/\n",
			"proc/self/mountinfo":              mountV1 + mountHybrid,
			mem + "/memory.limit_in_bytes":     "67108864",
			"sys/fs/cgroup/unified/memory.max": "1",
		}, want: 64 << 20, source: "v1"},
		{name: "no memory controller", files: map[string]string{
			"proc/self/cgroup":    "1:cpu:/\n",
			"proc/self/mountinfo": mountCPU,
		}, want: 0, source: "no memory cgroup"},
		{name: "no /proc/self/cgroup", files: map[string]string{}, want: 0, source: "no /proc/self/cgroup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := writeTree(t, tt.files)
			got, source, err := containerLimit(root)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("limit = %d, want %d (source %q)", got, tt.want, source)
			}
			if !strings.Contains(source, tt.source) {
				t.Errorf("source = %q, want it to contain %q", source, tt.source)
			}
		})
	}
}

// TestContainerLimitAgreesWithAutomemlimit checks the reader against the
// library's on this machine's real cgroup files.
func TestContainerLimitAgreesWithAutomemlimit(t *testing.T) {
	got, source, err := ContainerLimit()
	if err != nil {
		t.Fatal(err)
	}
	lib, libErr := memlimit.FromCgroup()
	t.Logf("ContainerLimit = %d (%s); automemlimit FromCgroup = %d, %v", got, source, lib, libErr)
	switch {
	case libErr == nil && int64(lib) != got:
		t.Fatalf("ContainerLimit %d, automemlimit %d", got, lib)
	case errors.Is(libErr, memlimit.ErrNoLimit) && got != 0:
		t.Fatalf("ContainerLimit %d, automemlimit reports no limit", got)
	}
}

// TestContainerLimitInRealCgroup runs this test binary inside a fresh
// cgroup v1 memory cgroup with a 300 MiB limit, where it must read that
// limit, as must automemlimit.
func TestContainerLimitInRealCgroup(t *testing.T) {
	if os.Getenv("MEMLIMIT_TEST_CHILD") != "" {
		t.Skip("child run")
	}
	const parent = "/sys/fs/cgroup/memory"
	if os.Geteuid() != 0 {
		testwait.SkipUnprivileged(t, "not root: cannot create a cgroup")
	}
	dir := filepath.Join(parent, fmt.Sprintf("relaycar-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		testwait.SkipUnprivileged(t, "cgroup v1 memory not writable: %v", err)
	}
	t.Cleanup(func() {
		for i := 0; i < 50; i++ {
			if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("cgroup %s left behind", dir)
	})
	const limit = 300 << 20
	if err := os.WriteFile(filepath.Join(dir, "memory.limit_in_bytes"), []byte(strconv.Itoa(limit)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestContainerLimitChild$", "-test.v")
	cmd.Env = append(os.Environ(), "MEMLIMIT_TEST_CHILD="+filepath.Join(dir, "cgroup.procs"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	want := fmt.Sprintf("limit=%d lib=%d", limit, limit)
	if !strings.Contains(string(out), want) {
		t.Fatalf("child output lacks %q:\n%s", want, out)
	}
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, "source=") {
			t.Log(strings.TrimSpace(line))
		}
	}
}

// TestContainerLimitChild is the child of TestContainerLimitInRealCgroup:
// it moves itself into the cgroup and reports what both readers see.
func TestContainerLimitChild(t *testing.T) {
	procs := os.Getenv("MEMLIMIT_TEST_CHILD")
	if procs == "" {
		t.Skip("run by TestContainerLimitInRealCgroup")
	}
	if err := os.WriteFile(procs, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatal(err)
	}
	got, source, err := ContainerLimit()
	if err != nil {
		t.Fatal(err)
	}
	lib, err := memlimit.FromCgroup()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("limit=%d lib=%d source=%s", got, lib, source)
}

func TestParseBudget(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{in: "auto"}, {in: "AUTO"}, {in: ""}, {in: "  auto "},
		{in: "268435456", want: 268435456},
		{in: "256MiB", want: 256 << 20},
		{in: "512Mi", want: 512 << 20},
		{in: "1GiB", want: 1 << 30},
		{in: "1Gi", want: 1 << 30},
		{in: "64KiB", want: 64 << 10},
		{in: "2TiB", want: 2 << 40},
		{in: "256 MiB", want: 256 << 20},
		{in: "100B", want: 100},
		{in: "500M", want: 500e6},
		{in: "1G", want: 1e9},
		{in: "1GB", want: 1e9},
		{in: "0", wantErr: true},
		{in: "0MiB", wantErr: true},
		{in: "-1", wantErr: true},
		{in: "1.5GiB", want: 3 << 29}, // Kubernetes quantities may be decimal
		{in: "1.5.5GiB", wantErr: true},
		{in: ".GiB", wantErr: true},
		{in: "512m", wantErr: true}, // Kubernetes milli, not mega
		{in: "MiB", wantErr: true},
		{in: "12 apples", wantErr: true},
		{in: "9223372036854775807", want: math.MaxInt64},
		{in: "9223372036854775808", wantErr: true},
		{in: "9000000TiB", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseBudget(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseBudget(%q) = %d, %v; want %d, err %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name     string
		setting  string
		limit    int64
		source   string
		limitErr error
		want     int64
		why      string
	}{
		{name: "auto, chart default 512Mi", setting: "auto", limit: 512 << 20, source: "cgroup v2 /sys/fs/cgroup/memory.max",
			want: 256 << 20, why: "half the container limit 512 MiB from cgroup v2 /sys/fs/cgroup/memory.max"},
		{name: "empty is auto", setting: "", limit: 1 << 30, want: 512 << 20, why: "half"},
		{name: "auto without a limit", setting: "auto", source: "cgroup v1 x: unlimited", want: DefaultBudget, why: "no container memory limit"},
		{name: "auto, unreadable limit", setting: "auto", limitErr: errors.New("boom"), want: DefaultBudget, why: "unreadable: boom"},
		{name: "explicit bytes", setting: "100MiB", limit: 512 << 20, want: 100 << 20, why: "100 MiB from spool.memory_budget"},
		{name: "explicit beyond the limit", setting: "1GiB", limit: 512 << 20, want: 1 << 30, why: "not below the container limit"},
		{name: "invalid falls back to auto", setting: "lots", limit: 512 << 20, want: 256 << 20, why: "invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, why := resolve(tt.setting, tt.limit, tt.source, tt.limitErr)
			if got != tt.want || !strings.Contains(why, tt.why) {
				t.Errorf("resolve = %d, %q; want %d, containing %q", got, why, tt.want, tt.why)
			}
		})
	}
	// The exported form on this machine always yields a usable budget.
	if n, why := Resolve("auto"); n <= 0 || why == "" {
		t.Errorf("Resolve(auto) = %d, %q", n, why)
	}
}

func TestSetGoMemLimit(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	unset := func(k string) {
		t.Setenv(k, "") // restores the original value after the test
		os.Unsetenv(k)
	}
	unset("GOMEMLIMIT")
	unset("AUTOMEMLIMIT")

	debug.SetMemoryLimit(math.MaxInt64)
	got, why, err := SetGoMemLimit(1000 << 20)
	if err != nil {
		t.Fatal(err)
	}
	want := int64(float64(1000<<20) * GoMemLimitRatio)
	if got != want || debug.SetMemoryLimit(-1) != want {
		t.Fatalf("goLimit %d (runtime %d), want %d; %s", got, debug.SetMemoryLimit(-1), want, why)
	}
	t.Log(why)

	debug.SetMemoryLimit(math.MaxInt64)
	if got, why, _ := SetGoMemLimit(0); got != math.MaxInt64 || !strings.Contains(why, "no container memory limit") {
		t.Fatalf("no limit: got %d, %q", got, why)
	}

	t.Setenv("GOMEMLIMIT", "123MiB")
	debug.SetMemoryLimit(123 << 20) // what the runtime did at start
	if got, why, _ := SetGoMemLimit(1000 << 20); got != 123<<20 || !strings.Contains(why, "GOMEMLIMIT=123MiB") {
		t.Fatalf("GOMEMLIMIT set: got %d, %q", got, why)
	}
	if debug.SetMemoryLimit(-1) != 123<<20 {
		t.Fatal("GOMEMLIMIT from the environment was overridden")
	}
	unset("GOMEMLIMIT")

	t.Setenv("AUTOMEMLIMIT", "off")
	debug.SetMemoryLimit(math.MaxInt64)
	if got, _, _ := SetGoMemLimit(1000 << 20); got != math.MaxInt64 {
		t.Fatalf("AUTOMEMLIMIT=off: got %d", got)
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 B", 1023: "1023 B", 1024: "1 KiB", 256 << 20: "256 MiB",
		3 << 29: "1.5 GiB", 9223372036854771712: "8192 PiB",
	} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
