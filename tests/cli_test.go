package tests

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

// runCLI runs the binary to completion (at most 30s) in dir and returns its
// exit code and combined stdout and stderr.
func runCLI(t *testing.T, dir string, env []string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(relaycarBin, args...)
	cmd.Dir = dir
	cmd.Env = childEnv(env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("relaycar %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("$ relaycar %s  # exit %d\n%s", strings.Join(args, " "), cmd.ProcessState.ExitCode(), out.String())
	if strings.Contains(out.String(), raceReport) {
		t.Errorf("relaycar %s reported a data race", strings.Join(args, " "))
	}
	return cmd.ProcessState.ExitCode(), out.String()
}

// problemLine is "yaml.path: message", the format of every `check` problem.
var problemLine = regexp.MustCompile(`^[a-z_]+(\[[0-9]+\])?(\.[A-Za-z0-9_-]+(\[[0-9]+\])?)*: \S`)

func TestCheck_BadConfig(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, yaml string
		want       []string
	}{
		{
			name: "semantic problems",
			yaml: `
listen: {address: 127.0.0.1:2525}
spool: {dir: ./spool, workers: 0}
upstreams:
  - {name: a, type: smtp}
  - {name: b, type: sendgrid}
routes:
  - {name: default, upstreams: [nope, a]}
`,
			want: []string{
				`upstreams[0].address: required for type smtp`,
				`upstreams[1].api_key: required for type sendgrid`,
				`routes[0].upstreams[0]: unknown upstream "nope"`,
				`spool.workers: must be at least 1`,
			},
		},
		{
			name: "unknown keys and bad values",
			yaml: `
listen: {adress: 127.0.0.1:2525}
spool: {max_age: forever}
upstreams:
  - {name: a, type: file, dir: ./out}
routes:
  - {name: default, upstreams: [a]}
`,
			want: []string{
				`listen.adress: unknown key (did you mean address?)`,
				`spool.max_age: "forever" is not a duration`,
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			code, out := runCLI(t, dir, nil, "check", "--config", "bad.yaml")
			if code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
			lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
			for _, w := range tc.want {
				found := false
				for _, l := range lines {
					if strings.HasPrefix(l, w) {
						found = true
					}
				}
				if !found {
					t.Errorf("no line starting %q in the output", w)
				}
			}
			if len(lines) != len(tc.want) {
				t.Errorf("%d output lines, want one per problem (%d)", len(lines), len(tc.want))
			}
			for _, l := range lines {
				if !problemLine.MatchString(l) {
					t.Errorf("line %q does not start with a YAML path", l)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "spool")); err == nil {
				t.Errorf("check created the spool directory")
			}
		})
	}
}

// envRef matches ${VAR} and ${VAR:-default} in a config file.
var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:-)?`)

// yamlKey finds the key of a "key: value" line.
var yamlKey = regexp.MustCompile(`([A-Za-z_]+):\s`)

// dummyEnv returns VAR=dummy for every ${VAR} without a default in a
// config, so `check` can validate examples that take secrets from the
// environment. Keys whose value has a syntax get a dummy of that syntax.
// A `*_file` key's variable, with or without a default, names a file this
// writes under a temp dir (`check` reads every *_file): a syntactically
// valid Google service account key for service_account_file, a dummy
// secret for the others.
func dummyEnv(t *testing.T, b []byte) []string {
	t.Helper()
	var env []string
	dir := ""
	for _, line := range strings.Split(string(b), "\n") {
		key := ""
		if m := yamlKey.FindStringSubmatch(line); m != nil {
			key = m[1]
		}
		for _, m := range envRef.FindAllStringSubmatch(line, -1) {
			if strings.HasSuffix(key, "_file") {
				if dir == "" {
					dir = t.TempDir()
				}
				content := []byte("dummy-secret-0123456789abcdef0123456789abcdef\n")
				if key == "service_account_file" {
					content, _ = fakes.ServiceAccountKey(t, "relaycar-check@example.iam.gserviceaccount.com", "https://oauth2.googleapis.com/token")
				}
				p := filepath.Join(dir, m[1])
				if err := os.WriteFile(p, content, 0o600); err != nil {
					t.Fatal(err)
				}
				env = append(env, m[1]+"="+p)
				continue
			}
			if m[2] != "" {
				continue // ${VAR:-default}: the default applies
			}
			v := "dummy"
			switch key {
			case "address":
				v = "dummy.invalid:587"
			case "region":
				v = "us-east-1"
			case "endpoint":
				v = "https://dummy.invalid"
			case "api_key", "access_key_id", "secret_access_key":
				// check refuses keys too short to be real ones.
				v = "dummy-key-0123456789abcdef0123456789abcdef"
			case "username", "sender":
				// A mailbox: msgraph's sender must be an address.
				v = "relay@dummy.invalid"
			}
			env = append(env, m[1]+"="+v)
		}
	}
	return env
}

func TestCheck_RepoConfigs(t *testing.T) {
	t.Parallel()
	files := []string{filepath.Join(repoRoot, "relay.yaml")}
	err := filepath.WalkDir(filepath.Join(repoRoot, "examples"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "kubernetes" {
			return fs.SkipDir // Helm values and charts, checked by charts/tests
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	for _, f := range files {
		rel, _ := filepath.Rel(repoRoot, f)
		t.Run(rel, func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte("upstreams:")) || !bytes.Contains(b, []byte("routes:")) {
				t.Skip("not a relay.yaml (no upstreams and routes)")
			}
			code, out := runCLI(t, filepath.Dir(f), dummyEnv(t, b), "check", "--config", f)
			if code != 0 {
				t.Errorf("relaycar check %s: exit %d, want 0\n%s", rel, code, out)
			}
			if !strings.Contains(out, ": ok (") {
				t.Errorf("relaycar check %s: output %q, want a summary line", rel, out)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	code, out := runCLI(t, t.TempDir(), nil, "version")
	if code != 0 {
		t.Errorf("relaycar version: exit %d, want 0", code)
	}
	if !strings.HasPrefix(out, "relaycar ") || !strings.Contains(out, "go1.") {
		t.Errorf("relaycar version: %q, want \"relaycar <version> (commit ..., go...)\"", out)
	}
}

func TestDefaultConfig_SendAndQueue(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join(repoRoot, "relay.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	smtpAddr, adminAddr := freeAddr(t), freeAddr(t)
	for old, repl := range map[string]string{"127.0.0.1:2525": smtpAddr, "127.0.0.1:9025": adminAddr} {
		if n := strings.Count(text, old); n != 1 {
			t.Fatalf("relay.yaml mentions %s %d times, want once (listen/admin address)", old, n)
		}
		text = strings.Replace(text, old, repl, 1)
	}
	if !strings.Contains(text, "dir: ./spool") || !strings.Contains(text, "dir: ./outbox") {
		t.Fatalf("relay.yaml no longer uses ./spool and ./outbox; update this test")
	}
	h := newHarnessRaw(t, text, smtpAddr, adminAddr, "spool", 20*time.Second)

	subject := "integration default config " + time.Now().Format(time.RFC3339Nano)
	code, out := runCLI(t, h.dir, nil, "send", "--config", "relay.yaml", "--subject", subject, "--to", "someone@example.net")
	if code != 0 {
		t.Fatalf("relaycar send: exit %d\n%s", code, out)
	}
	outbox := filepath.Join(h.dir, "outbox")
	var eml []string
	waitFor(t, 10*time.Second, "a .json and .eml in ./outbox", func() bool {
		eml, _ = filepath.Glob(filepath.Join(outbox, "*.eml"))
		js, _ := filepath.Glob(filepath.Join(outbox, "*.json"))
		return len(eml) == 1 && len(js) == 1
	})
	data, err := os.ReadFile(eml[0])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "Subject: "+subject) {
		t.Errorf("%s does not contain the subject %q:\n%s", eml[0], subject, data)
	}
	h.waitSpoolEmpty(10 * time.Second)

	code, out = runCLI(t, h.dir, nil, "queue", "ls", "--config", "relay.yaml")
	if code != 0 || !strings.Contains(out, "0 messages") || !strings.HasPrefix(out, "ID") {
		t.Errorf("relaycar queue ls while serving: exit %d, output %q; want 0 and an empty table", code, out)
	}
	code, out = runCLI(t, h.dir, nil, "queue", "ls", "--json", "--config", "relay.yaml")
	if code != 0 || strings.TrimSpace(out) != "[]" {
		t.Errorf("relaycar queue ls --json: exit %d, output %q; want 0 and []", code, out)
	}
	code, out = runCLI(t, h.dir, nil, "queue", "dead", "--config", "relay.yaml")
	if code != 0 || !strings.Contains(out, "0 messages") || !strings.Contains(out, "REASON") {
		t.Errorf("relaycar queue dead while serving: exit %d, output %q; want 0 and an empty table", code, out)
	}
	code, out = runCLI(t, h.dir, nil, "queue", "retry", "--all", "--config", "relay.yaml")
	if code != 0 || !strings.Contains(out, "0 messages due now") {
		t.Errorf("relaycar queue retry --all while serving (through the admin API): exit %d, output %q", code, out)
	}
	code, out = runCLI(t, h.dir, nil, "queue", "drop", "nosuchid", "--config", "relay.yaml")
	if code != 1 {
		t.Errorf("relaycar queue drop of an unknown id: exit %d, want 1\n%s", code, out)
	}
	// The relay still owns its spool and still serves.
	if code, _ := h.get("/readyz"); code != 200 {
		t.Errorf("GET /readyz after the queue commands: %d", code)
	}
}
