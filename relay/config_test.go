package relay

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/yamlconf"
)

var update = flag.Bool("update", false, "rewrite golden .err files")

// Each testdata/config/bad/NN-name.yaml must fail Load+Validate with exactly
// the lines in NN-name.err. Run with -update to regenerate after a
// deliberate change, then read the diff.
func TestConfig_BadGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/config/bad/*.yaml")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			_, err := LoadValid(f)
			if err == nil {
				t.Fatal("config accepted, want errors")
			}
			got := err.Error() + "\n"
			golden := strings.TrimSuffix(f, ".yaml") + ".err"
			if *update {
				os.WriteFile(golden, []byte(got), 0o644)
			}
			want, _ := os.ReadFile(golden)
			if got != string(want) {
				t.Errorf("errors:\n%s\nwant:\n%s", got, want)
			}
			for _, line := range strings.Split(strings.TrimSpace(got), "\n") {
				if !strings.Contains(line, ": ") || strings.HasPrefix(line, " ") {
					t.Errorf("line %q does not start with a YAML path", line)
				}
			}
		})
	}
}

// Every problem is a FieldError, so callers (LoadValid's one-per-path
// rule, say) read paths without parsing messages.
func TestConfig_ProblemsAreFieldErrors(t *testing.T) {
	files, _ := filepath.Glob("testdata/config/bad/*.yaml")
	for _, f := range files {
		_, err := LoadValid(f)
		j, ok := err.(interface{ Unwrap() []error })
		if !ok {
			t.Errorf("%s: %T is not joined errors", f, err)
			continue
		}
		for _, e := range j.Unwrap() {
			var fe yamlconf.FieldError
			if !errors.As(e, &fe) || fe.Path == "" || fe.Error() != e.Error() {
				t.Errorf("%s: %q (%T) is not a FieldError with a path", f, e, e)
			}
		}
	}
}

func TestConfig_DefaultRelayYAMLIsValid(t *testing.T) {
	cfg, err := Load("../relay.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Upstreams[0].Type != "file" || cfg.Listen.Address != "127.0.0.1:2525" || cfg.Admin.Address != "127.0.0.1:9025" {
		t.Errorf("default relay.yaml drifted: %+v", cfg)
	}
}

func TestConfig_EnvAndSecretFiles(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	os.WriteFile(keyFile, []byte("SG.file-secret\n"), 0o600)
	t.Setenv("RC_TEST_WORKERS", "7")
	t.Setenv("RC_TEST_HOST", "mail.internal")
	t.Setenv("RC_TEST_INJECT", "x\nroutes: []")
	cfg, err := Parse([]byte(`
listen:
  hostname: ${RC_TEST_HOST}
  address: ${RC_TEST_ADDR:-127.0.0.1:2626}
spool:
  workers: ${RC_TEST_WORKERS}
  max_age: ${RC_TEST_AGE:-1h}
upstreams:
  - name: sg
    type: sendgrid
    api_key_file: ` + keyFile + `
  - name: relay
    type: smtp
    address: smtp.example.com:25
    username: ${RC_TEST_INJECT}
    password: ${RC_TEST_EMPTY:-}p
routes:
  - name: default
    upstreams: [sg, relay]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Listen.Hostname != "mail.internal" || cfg.Listen.Address != "127.0.0.1:2626" || cfg.Spool.Workers != 7 || cfg.Spool.MaxAge != time.Hour {
		t.Errorf("expansion: %+v %+v", cfg.Listen, cfg.Spool)
	}
	if got := cfg.Upstreams[0].APIKey.Reveal(); got != "SG.file-secret" {
		t.Errorf("api_key_file: got %q", got)
	}
	// A value from the environment stays one scalar: it cannot add keys.
	if cfg.Upstreams[1].Username != "x\nroutes: []" || len(cfg.Routes) != 1 {
		t.Errorf("env value changed the YAML structure: %q %d", cfg.Upstreams[1].Username, len(cfg.Routes))
	}
	if cfg.Routes[0].Strategy != "failover" || cfg.Upstreams[1].TLS != "starttls" || cfg.Upstreams[0].MaxMessageBytes != 30<<20 {
		t.Errorf("defaults not applied: %+v", cfg.Upstreams)
	}
}

func TestConfig_SecretsNeverPrinted(t *testing.T) {
	t.Setenv("RC_TEST_SECRET", "sk-very-secret-value")
	cfg, err := Parse([]byte(`
upstreams:
  - name: sg
    type: sendgrid
    api_key: ${RC_TEST_SECRET}
    dir: ./x
routes:
  - name: default
    upstreams: [sg, nope]
`))
	if err != nil {
		t.Fatal(err)
	}
	err = cfg.Validate()
	if err == nil {
		t.Fatal("want errors")
	}
	for _, s := range []string{err.Error(), cfg.Upstreams[0].APIKey.String()} {
		if strings.Contains(s, "sk-very-secret-value") {
			t.Errorf("secret printed: %s", s)
		}
	}
}

// A redis.address written as a URL with its password (redis-cli's
// redis://:password@host:port) is refused without quoting the password.
func TestConfig_RedisAddressNeverEchoesItsPassword(t *testing.T) {
	t.Parallel()
	for _, addr := range []string{"redis://:hunter2@redis:6379", "rediss://default:hunter2@redis:6380/0", ":hunter2@redis:6379", "hunter2@redis:6379"} {
		cfg := Default()
		cfg.Redis.Address = addr
		err := cfg.Validate()
		if err == nil {
			t.Errorf("%s accepted", addr)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "hunter2") || !strings.Contains(msg, "redis.address: ") || !strings.Contains(msg, "<secret>@redis:63") {
			t.Errorf("%s: %s", addr, msg)
		}
	}
}

// shutdown.grace replaces shutdown_grace, which is still read; giving
// both is a mistake, and draining to this relay's own address would loop.
func TestConfig_ShutdownGraceAndDrainTo(t *testing.T) {
	const base = `
listen: {address: "0.0.0.0:2525"}
upstreams: [{name: f, type: file, dir: ./outbox}]
routes: [{name: default, upstreams: [f]}]
`
	for _, tc := range []struct {
		name, yaml string
		grace      time.Duration
		problem    string
	}{
		{"default", "", 20 * time.Second, ""},
		{"old key", "shutdown_grace: 7s\n", 7 * time.Second, ""},
		{"new key", "shutdown: {grace: 9s, drain_to: relaycar-peer:2525}\n", 9 * time.Second, ""},
		{"both", "shutdown_grace: 7s\nshutdown: {grace: 9s}\n", 0, "shutdown_grace: set only one of shutdown_grace and shutdown.grace"},
		{"self", "shutdown: {drain_to: 127.0.0.1:2525}\n", 0, `shutdown.drain_to: "127.0.0.1:2525" is this relay's own listen.address`},
		{"no port", "shutdown: {drain_to: peer}\n", 0, `shutdown.drain_to: "peer": want host:port`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml + base))
			if err == nil && cfg != nil {
				err = cfg.Validate()
			}
			switch {
			case tc.problem == "" && err != nil:
				t.Fatalf("unexpected: %v", err)
			case tc.problem != "" && (err == nil || !strings.Contains(err.Error(), tc.problem)):
				t.Fatalf("got %v, want %q", err, tc.problem)
			case tc.problem == "" && cfg.Grace() != tc.grace:
				t.Errorf("grace %v, want %v", cfg.Grace(), tc.grace)
			}
		})
	}
}

// drain_to must not name this relay by any spelling of its listen address:
// a drain to itself would retry until its time runs out.
func TestConfig_DrainToSelfInEverySpelling(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		listen, drainTo string
		self            bool
	}{
		{":25", "127.0.0.1:25", true},
		{":25", "localhost:25", true},
		{":25", "[::1]:25", true},
		{"0.0.0.0:2525", "LOCALHOST:2525", true},
		{"127.0.0.1:2525", "127.0.0.1:2526", false},
		{":25", "relaycar-peer:25", false},
	} {
		if got := sameAddr(tc.drainTo, tc.listen); got != tc.self {
			t.Errorf("sameAddr(%q, %q) = %v, want %v", tc.drainTo, tc.listen, got, tc.self)
		}
	}
}

// A password that YAML reads as an alias is not quoted back by the error
// (relaycar check prints it, a reload logs it), which says what to do.
func TestConfig_AliasErrorDoesNotQuoteTheValue(t *testing.T) {
	t.Parallel()
	const pw = "*Xk9-secret-password-77"
	_, err := Parse([]byte("upstreams:\n  - name: s\n    type: smtp\n    address: 127.0.0.1:25\n    username: u\n    password: " + pw + "\n"))
	if err == nil || strings.Contains(err.Error(), pw[1:]) || !strings.Contains(err.Error(), "quote the value") {
		t.Errorf("err = %v, want a hint to quote it and no trace of the value", err)
	}
}

// spool.max_bytes takes what the chart copies from spoolSizeLimit,
// Kubernetes quantities included, and names the path when it cannot.
func TestConfig_SpoolMaxBytes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		value string
		want  int64
		err   string
	}{
		{"1Gi", 1 << 30, ""},
		{"1.5Gi", 3 << 29, ""},
		{"40Mi", 40 << 20, ""}, // less than two 25 MiB messages: a warning at start, not an error
		{"500000", 500000, ""},
		{"", 0, ""},
		{"lots", 0, `spool.max_bytes: "lots": want bytes`},
	} {
		cfg, err := Load("../relay.yaml")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Spool.MaxBytes = tc.value
		err = cfg.Validate()
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: %v, want %s", tc.value, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.value, err)
		case tc.err == "" && cfg.Spool.maxBytes() != tc.want:
			t.Errorf("%q = %d bytes, want %d", tc.value, cfg.Spool.maxBytes(), tc.want)
		}
	}
}
