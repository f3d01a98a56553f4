package relay

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The metric names are a contract (README: "a stable contract"): the
// README's table lists each one the code registers and no other, and the
// chart's alerts and dashboard query only registered ones. A metric added
// without its row, or renamed under a chart rule, fails here rather than
// in a user's Prometheus.
func TestDocs_MetricsMatchTheCode(t *testing.T) {
	const repoRoot = ".." // the module root, from this package's directory
	registered := map[string]bool{}
	nameRe := regexp.MustCompile(`(?:Name:\s+|NewDesc\(\s*)"(relaycar_[a-z0-9_]+)"`)
	for _, dir := range []string{"cmd", "relay", "upstreams", "policy", "internal"} {
		err := filepath.WalkDir(filepath.Join(repoRoot, dir), func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			src, err := os.ReadFile(path)
			for _, m := range nameRe.FindAllSubmatch(src, -1) {
				registered[string(m[1])] = true
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(registered) < 20 {
		t.Fatalf("found only %d registered metric names: %v", len(registered), registered)
	}

	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(relaycar_[a-z0-9_]+)` \\|").FindAllSubmatch(readme, -1) {
		documented[string(m[1])] = true
	}
	for name := range registered {
		if !documented[name] {
			t.Errorf("%s is registered but has no row in README.md's metrics table", name)
		}
	}
	for name := range documented {
		if !registered[name] {
			t.Errorf("README.md's metrics table lists %s, which the code does not register", name)
		}
	}

	// Histograms are queried through their series' suffixes.
	known := func(name string) bool {
		for _, suffix := range []string{"", "_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && registered[base] {
				return true
			}
		}
		return false
	}
	var chartFiles []string
	for _, glob := range []string{"charts/relaycar/templates/*", "charts/relaycar/dashboards/*"} {
		m, _ := filepath.Glob(filepath.Join(repoRoot, glob))
		chartFiles = append(chartFiles, m...)
	}
	used := regexp.MustCompile(`relaycar_[a-z0-9_]+`)
	queried := 0
	for _, f := range chartFiles {
		text, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range slices.Compact(used.FindAllString(string(text), -1)) {
			queried++
			if !known(name) {
				t.Errorf("%s queries %s, which the code does not register", filepath.Base(f), name)
			}
		}
	}
	if queried == 0 {
		t.Fatal("the chart's alerts and dashboard query no relaycar metric: the globs found nothing")
	}
}
