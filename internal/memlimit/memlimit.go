// Package memlimit finds the container's memory limit and turns the
// spool.memory_budget setting into bytes.
//
// relaycar runs in Kubernetes with a memory limit; exceeding it gets the pod
// OOM-killed mid-delivery. The limit is read from the cgroup the process is
// in (cgroup v1 memory.limit_in_bytes or v2 memory.max), half of it becomes
// the budget for bodies held whole in memory (see internal/membudget), and
// 90% of it becomes the Go runtime's soft memory limit so the GC works
// harder before the kernel kills the process.
package memlimit

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

// DefaultBudget is the budget when the container has no memory limit.
const DefaultBudget int64 = 256 << 20

// GoMemLimitRatio is the fraction of the container limit given to the Go
// runtime as its soft limit: the rest is headroom for non-heap memory
// (stacks, the binary, page cache charged to the cgroup).
const GoMemLimitRatio = 0.9

// unlimitedAbove: cgroup v1 reports "no limit" as the page counter maximum
// times the page size (9223372036854771712 with 4 KiB pages, a little less
// with 64 KiB pages); no real limit comes near 4 EiB.
const unlimitedAbove = 1 << 62

// ContainerLimit returns the memory limit of the cgroup this process is in,
// and the file it came from. limit is 0 when there is none (not in a
// cgroup, no memory controller, or "max"/unlimited); source then says why.
// err is set only when a cgroup file exists but cannot be read or parsed.
func ContainerLimit() (limit int64, source string, err error) {
	return containerLimit("/")
}

// containerLimit is ContainerLimit over a file tree rooted at root, the seam
// the tests use with fake /proc and /sys trees.
func containerLimit(root string) (int64, string, error) {
	cgroups, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup"))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, "no /proc/self/cgroup", nil
	} else if err != nil {
		return 0, "", err
	}
	var v1Path, v2Path string
	var hasV1, hasV2 bool
	for line := range strings.Lines(string(cgroups)) {
		id, rest, ok1 := strings.Cut(strings.TrimSpace(line), ":")
		controllers, path, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 {
			continue
		}
		switch {
		case !hasV1 && id != "0" && slices.Contains(strings.Split(controllers, ","), "memory"):
			v1Path, hasV1 = path, true
		case !hasV2 && id == "0" && controllers == "":
			v2Path, hasV2 = path, true
		}
	}
	mounts, err := readMounts(root)
	if err != nil {
		return 0, "", err
	}
	// A controller is bound to one hierarchy only: if v1 has memory, the
	// v2 tree has no memory.max worth reading.
	switch {
	case hasV1:
		m, ok := mounts.v1, mounts.hasV1
		if !ok {
			m = mount{root: "/", point: "/sys/fs/cgroup/memory"}
		}
		return readV1(root, cgroupDir(root, m, v1Path))
	case hasV2:
		m, ok := mounts.v2, mounts.hasV2
		if !ok {
			m = mount{root: "/", point: "/sys/fs/cgroup"}
		}
		return readV2(root, m.point, cgroupDir(root, m, v2Path))
	}
	return 0, "no memory cgroup in /proc/self/cgroup", nil
}

// mount is one cgroup file system mount: which cgroup is its root and where
// it is mounted.
type mount struct{ root, point string }

type mounts struct {
	v1, v2       mount
	hasV1, hasV2 bool
}

// readMounts finds the cgroup mounts in /proc/self/mountinfo; a missing
// file leaves the conventional paths to the caller.
func readMounts(root string) (mounts, error) {
	var ms mounts
	f, err := os.Open(filepath.Join(root, "proc/self/mountinfo"))
	if errors.Is(err, fs.ErrNotExist) {
		return ms, nil
	} else if err != nil {
		return ms, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// 35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
		pre, post, ok := strings.Cut(s.Text(), " - ")
		a, b := strings.Fields(pre), strings.Fields(post)
		if !ok || len(a) < 5 || len(b) < 3 {
			continue
		}
		m := mount{root: unescape(a[3]), point: unescape(a[4])}
		switch {
		case b[0] == "cgroup" && !ms.hasV1 && slices.Contains(strings.Split(b[2], ","), "memory"):
			ms.v1, ms.hasV1 = m, true
		case b[0] == "cgroup2" && !ms.hasV2:
			ms.v2, ms.hasV2 = m, true
		}
	}
	return ms, s.Err()
}

// unescape undoes mountinfo's octal escapes (\040 is a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	if u, err := strconv.Unquote(`"` + strings.ReplaceAll(s, `"`, `\"`) + `"`); err == nil {
		return u
	}
	return s
}

// cgroupDir maps the process's cgroup path onto the mount. When the path
// is not below the mount's root, or the directory is not there (a container
// whose cgroup is mounted as / without a cgroup namespace), the mount point
// itself is the container's cgroup.
func cgroupDir(root string, m mount, path string) string {
	rel, ok := strings.CutPrefix(path, m.root)
	if !ok || (rel != "" && !strings.HasPrefix(rel, "/") && m.root != "/") {
		return m.point
	}
	rel = strings.TrimPrefix(rel, "/")
	if rel != "" && !filepath.IsLocal(rel) {
		return m.point
	}
	dir := filepath.Join(m.point, rel)
	if st, err := os.Stat(filepath.Join(root, dir)); err != nil || !st.IsDir() {
		return m.point
	}
	return dir
}

// readV1 takes the smaller of the cgroup's own limit and
// hierarchical_memory_limit, which includes every ancestor's limit.
func readV1(root, dir string) (int64, string, error) {
	limitFile := filepath.Join(dir, "memory.limit_in_bytes")
	limit, err := readUint(filepath.Join(root, limitFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, "cgroup v1: no " + limitFile, nil
	} else if err != nil {
		return 0, "", err
	}
	source := "cgroup v1 " + limitFile
	statFile := filepath.Join(dir, "memory.stat")
	if h, ok, err := readStat(filepath.Join(root, statFile), "hierarchical_memory_limit"); err != nil {
		return 0, "", err
	} else if ok && h < limit {
		limit, source = h, "cgroup v1 "+statFile+" hierarchical_memory_limit"
	}
	if limit >= unlimitedAbove {
		return 0, source + ": unlimited", nil
	}
	return int64(limit), source, nil
}

// readV2 takes the smallest memory.max from the cgroup up to the mount
// point: a parent's limit binds its children too.
func readV2(root, top, dir string) (int64, string, error) {
	var limit uint64 = math.MaxUint64
	source := "cgroup v2 " + filepath.Join(dir, "memory.max") + ": max"
	for d := dir; ; d = filepath.Dir(d) {
		file := filepath.Join(d, "memory.max")
		b, err := os.ReadFile(filepath.Join(root, file))
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return 0, "", err
		case strings.TrimSpace(string(b)) == "max":
		default:
			v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				return 0, "", fmt.Errorf("%s: %w", file, err)
			}
			if v < limit {
				limit, source = v, "cgroup v2 "+file
			}
		}
		if d == top || d == filepath.Dir(d) || !strings.HasPrefix(d, top) {
			break
		}
	}
	if limit >= unlimitedAbove {
		return 0, source, nil
	}
	return int64(limit), source, nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// readStat returns one "key value" line of a memory.stat file.
func readStat(path, key string) (uint64, bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	} else if err != nil {
		return 0, false, err
	}
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		if k == key {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, false, fmt.Errorf("%s: %s: %w", path, key, err)
			}
			return n, true, nil
		}
	}
	return 0, false, nil
}

// unitSize is the multiplier of a suffix ParseBudget accepts: IEC binary
// ones as Go's GOMEMLIMIT and Kubernetes' Mi/Gi write them, and SI decimal
// ones as Kubernetes means them. Lower-case "m" is deliberately absent: in
// a Kubernetes quantity it means milli.
func unitSize(unit string) (int64, bool) {
	switch unit {
	case "", "B":
		return 1, true
	case "Ki", "KiB":
		return 1 << 10, true
	case "Mi", "MiB":
		return 1 << 20, true
	case "Gi", "GiB":
		return 1 << 30, true
	case "Ti", "TiB":
		return 1 << 40, true
	case "k", "K", "kB", "KB":
		return 1e3, true
	case "M", "MB":
		return 1e6, true
	case "G", "GB":
		return 1e9, true
	case "T", "TB":
		return 1e12, true
	}
	return 0, false
}

// ParseBudget parses spool.memory_budget: "auto" (or empty) returns 0;
// otherwise a positive whole number of bytes, optionally with a unit:
// 268435456, "256MiB", "512Mi", "1GiB", "1G" (10^9), "256 MiB".
func ParseBudget(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || strings.EqualFold(s, "auto") {
		return 0, nil
	}
	n, err := ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("memory_budget %v", err)
	}
	if n == 0 {
		return 0, fmt.Errorf("memory_budget %q: must be positive (auto for the default)", s)
	}
	return n, nil
}

// ParseSize reads bytes such as 268435456, 256MiB or Kubernetes' 1Gi; ""
// is 0.
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(s)
	}
	num, unit := s[:i], strings.TrimSpace(s[i:])
	mult, ok := unitSize(unit)
	if num == "" || !ok {
		return 0, fmt.Errorf("%q: want bytes such as 268435456, 256MiB, 1Gi", s)
	}
	if strings.Contains(num, ".") {
		// Kubernetes quantities may be decimal: 1.5Gi.
		f, err := strconv.ParseFloat(num, 64)
		if err != nil || f*float64(mult) >= math.MaxInt64 {
			return 0, fmt.Errorf("%q: want bytes such as 268435456, 256MiB, 1.5Gi", s)
		}
		return int64(f * float64(mult)), nil
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("%q: too large", s)
	}
	return n * mult, nil
}

// Resolve turns the spool.memory_budget setting into bytes, with a line for
// the start-up log saying where the number came from. auto is half the
// container limit, or DefaultBudget without one. Resolve always returns a
// usable budget: config validation should reject a bad setting with
// ParseBudget first; if one gets here anyway it is treated as auto.
func Resolve(budgetSetting string) (bytes int64, why string) {
	limit, source, err := ContainerLimit()
	return resolve(budgetSetting, limit, source, err)
}

func resolve(setting string, limit int64, source string, limitErr error) (int64, string) {
	n, err := ParseBudget(setting)
	prefix := ""
	if err != nil {
		prefix = fmt.Sprintf("invalid %v; using auto: ", err)
	} else if n > 0 {
		why := "memory budget " + FormatBytes(n) + " from spool.memory_budget"
		if limit > 0 && n >= limit {
			why += " (not below the container limit " + FormatBytes(limit) + ": it bounds nothing)"
		}
		return n, why
	}
	switch {
	case limitErr != nil:
		return DefaultBudget, prefix + fmt.Sprintf("memory budget %s (auto; container limit unreadable: %v)", FormatBytes(DefaultBudget), limitErr)
	case limit <= 0:
		return DefaultBudget, prefix + fmt.Sprintf("memory budget %s (auto; no container memory limit: %s)", FormatBytes(DefaultBudget), source)
	}
	return max(limit/2, 1), prefix + fmt.Sprintf("memory budget %s (auto: half the container limit %s from %s)",
		FormatBytes(max(limit/2, 1)), FormatBytes(limit), source)
}

// SetGoMemLimit sets the Go runtime's soft memory limit to GoMemLimitRatio
// of containerLimit, through automemlimit, so the GC runs harder as the
// heap nears the limit instead of the kernel OOM-killing the process. The
// environment wins: with GOMEMLIMIT set (the runtime has applied it) or
// AUTOMEMLIMIT=off nothing changes, and AUTOMEMLIMIT=0.8 changes the
// ratio. containerLimit <= 0 (no limit) changes nothing. It returns the
// limit now in force and a line for the start-up log.
func SetGoMemLimit(containerLimit int64) (goLimit int64, why string, err error) {
	current := debug.SetMemoryLimit(-1)
	if v, ok := os.LookupEnv("GOMEMLIMIT"); ok {
		return current, "GOMEMLIMIT=" + v + " from the environment", nil
	}
	if os.Getenv("AUTOMEMLIMIT") == "off" {
		return current, "AUTOMEMLIMIT=off: Go memory limit left unset", nil
	}
	if containerLimit <= 0 {
		return current, "no container memory limit: Go memory limit left unset", nil
	}
	goLimit, err = memlimit.Set(
		memlimit.WithProvider(memlimit.Limit(uint64(containerLimit))),
		memlimit.WithRatio(GoMemLimitRatio),
	)
	if err != nil {
		return goLimit, "", err
	}
	return goLimit, fmt.Sprintf("Go memory limit %s (of container limit %s)", FormatBytes(goLimit), FormatBytes(containerLimit)), nil
}

// FormatBytes writes n in the largest binary unit that keeps one decimal,
// for log lines ("256 MiB", "1.5 GiB").
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	v, i := float64(n), -1
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	s := strconv.FormatFloat(v, 'f', 1, 64)
	s = strings.TrimSuffix(s, ".0")
	return s + " " + [...]string{"KiB", "MiB", "GiB", "TiB", "PiB"}[i]
}
