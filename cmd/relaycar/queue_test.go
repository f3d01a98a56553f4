package main

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/relay"
	"github.com/relaycar/relaycar/upstreams"
)

// startRelay runs an in-process relay on 127.0.0.1 with a file upstream,
// as `relaycar serve` would, and returns its admin address.
func startRelay(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg := relay.Default()
	cfg.Listen.Address, cfg.Admin.Address = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	cfg.ShutdownGrace = time.Second
	u := upstreams.Config{Name: "outbox", Type: "file", Dir: filepath.Join(dir, "outbox")}
	u.ApplyDefaults()
	cfg.Upstreams = []upstreams.Config{u}
	cfg.Routes = []policy.RouteConfig{{Name: "default", Upstreams: []string{"outbox"}, Strategy: "failover"}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	r, err := relay.New(&cfg, relay.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("relay did not stop")
		}
	})
	return r.AdminAddr().String()
}

// The admin API refuses state changes without X-Relaycar-Request (a
// cross-site form cannot send it); the CLI must send it, or `relaycar
// queue retry/drop` stops working beside a running relay.
func TestViaAPI_PassesTheAdminChecks(t *testing.T) {
	addr := startRelay(t)
	msg, err := viaAPI(addr, "retry", "")
	if err != nil || !strings.Contains(msg, "0 messages due now") {
		t.Errorf("queue retry --all via the API = %q, %v", msg, err)
	}
	if _, err := viaAPI(addr, "drop", "nosuchid"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("queue drop of an unknown id via the API = %v, want not exist (the request got past the checks)", err)
	}
	if _, err := viaAPI(addr, "retry", "nosuchid"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("queue retry of an unknown id via the API = %v, want not exist (the request got past the checks)", err)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// A listing that could not be written must fail the command, or a script
// reads a cut-short queue as the whole of it.
func TestPrintEntries_ReportsWriteErrors(t *testing.T) {
	envs := []*relay.Envelope{{ID: "a", From: "x@example.com", ReceivedAt: time.Now()}}
	for _, tc := range []struct{ dead, asJSON bool }{{false, false}, {true, false}, {false, true}} {
		if err := printEntries(failingWriter{}, envs, tc.dead, tc.asJSON); err == nil {
			t.Errorf("dead=%v json=%v: no error", tc.dead, tc.asJSON)
		}
	}
	var b strings.Builder
	if err := printEntries(&b, envs, false, false); err != nil || !strings.HasSuffix(b.String(), "1 messages\n") {
		t.Errorf("err %v, output %q", err, b.String())
	}
}

// queue reads spool and admin only: an upstream's unset ${VAR} in an
// operator's shell does not stop `queue ls`, a broken spool section does.
func TestQueue_NeedsOnlyItsSections(t *testing.T) {
	dir := t.TempDir()
	spoolDir := filepath.Join(dir, "spool")
	if err := os.Mkdir(spoolDir, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(spoolKey string) string {
		path := filepath.Join(dir, "relay.yaml")
		os.WriteFile(path, []byte(`spool: {`+spoolKey+`: `+spoolDir+`}
admin: {address: 127.0.0.1:1}
upstreams:
  - name: mg
    type: mailgun
    domain: mg.example.com
    api_key: ${RELAYCAR_TEST_UNSET_KEY}
routes:
  - {name: default, upstreams: [mg]}
`), 0o600)
		return path
	}
	var out, errOut strings.Builder
	if code := run([]string{"queue", "--config", write("dir"), "ls"}, &out, &errOut); code != exitOK || errOut.Len() > 0 {
		t.Errorf("queue ls with an upstream's variable unset: exit %d, %s", code, errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"queue", "--config", write("dirr"), "ls"}, &out, &errOut); code != exitUsage || !strings.Contains(errOut.String(), "spool.dirr") {
		t.Errorf("queue ls with a bad spool key: exit %d, %q; want %d naming spool.dirr", code, errOut.String(), exitUsage)
	}
}

// drain --config reads routes only, but a broken routes section, or a
// misspelt top-level key that would leave it empty, stops it: without
// the routes a staging route's mail would go to its real recipients.
func TestDrain_ConfigRoutesMustLoad(t *testing.T) {
	dir := t.TempDir()
	spoolDir := filepath.Join(dir, "spool")
	if err := os.Mkdir(spoolDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct{ yaml, want string }{
		"misspelt key": {"route:\n  - {name: staging, redirect_all_to: [qa@example.com], upstreams: [x]}\n", "route"},
		"bad redirect": {"upstreams:\n  - {name: x, type: file, dir: /tmp}\nroutes:\n  - {name: staging, redirect_all_to: [not-an-address], upstreams: [x]}\n", "routes[0].redirect_all_to"},
	} {
		path := filepath.Join(dir, "relay.yaml")
		os.WriteFile(path, []byte(tc.yaml), 0o600)
		var out, errOut strings.Builder
		code := run([]string{"drain", "--spool", spoolDir, "--to", "127.0.0.1:1", "--config", path}, &out, &errOut)
		if code != exitUsage || !strings.Contains(errOut.String(), tc.want) {
			t.Errorf("%s: exit %d, %q; want %d naming %s", name, code, errOut.String(), exitUsage, tc.want)
		}
	}
}
