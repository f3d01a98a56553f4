package tests

import (
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// The failover demo in the README must keep working: primary down mid-stream,
// messages to the backup, primary back, nothing lost.
func TestFailoverDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about 20s")
	}
	t.Parallel()
	cmd := exec.Command("go", "run", "./examples/failover-demo")
	cmd.Dir = ".."
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
