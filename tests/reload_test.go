package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

// reloadConfig is a relay with an authenticated smarthost for the default
// route and a broken one (its breaker opens on the first failure and
// stays open for an hour) for mail to broken.example.
func reloadConfig(authAddr, passwordFile, brokenAddr string) string {
	return fmt.Sprintf(`
upstreams:
  - {name: smarthost, type: smtp, address: %q, tls: none, username: relay, password_file: %q}
  - {name: broken, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 1, open_for: 1h}}
routes:
  - {name: broken, match: {recipient_domains: [broken.example]}, upstreams: [broken]}
  - {name: default, upstreams: [smarthost]}
`, authAddr, passwordFile, brokenAddr)
}

// A rotated password file (the smarthost now takes only the new one) and
// SIGHUP: delivery resumes in the same process; the untouched upstream's
// open breaker is still open after the reload. Then an invalid config:
// the old one keeps delivering and the reload metric says 0.
func TestReload_SIGHUPRotatesPasswordKeepsOtherBreaker(t *testing.T) {
	t.Parallel()
	auth := testsmtp.Start(t, testsmtp.Options{Users: map[string]string{"relay": "old-password-1"}})
	broken := downUpstream(t, func(string) bool { return false })
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte("old-password-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgText := reloadConfig(auth.Addr, pwFile, broken.Addr)
	h := newHarness(t, cfgText, withArgs("--reload-poll", "0"))
	pid := h.current().cmd.Process.Pid

	h.mustSend(sender, []string{"a@example.net"}, message(sender, "a@example.net", 1, "before"))
	h.mustSend(sender, []string{"x@broken.example"}, message(sender, "x@broken.example", 2, "opens the breaker"))
	waitFor(t, 10*time.Second, "the first message and the open breaker", func() bool {
		return auth.Count() == 1 && h.metric("relaycar_upstream_breaker_state", "upstream=broken") == 2
	})

	// The secret is rotated on both sides; without a reload the relay
	// would keep sending the old password.
	auth.SetUsers(map[string]string{"relay": "new-password-2"})
	if err := os.WriteFile(pwFile, []byte("new-password-2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.current().cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the reload log line", func() bool { return h.logContains("config reloaded") })
	if !h.logContains("upstreams_changed=[smarthost]") {
		t.Error("the reload line does not name the changed upstream")
	}
	if v := h.metric("relaycar_upstream_breaker_state", "upstream=broken"); v != 2 {
		t.Errorf("broken's breaker = %v right after the reload, want still open (2)", v)
	}
	h.mustSend(sender, []string{"b@example.net"}, message(sender, "b@example.net", 3, "after the rotation"))
	waitFor(t, 10*time.Second, "delivery with the new password", func() bool { return auth.Count() == 2 })
	if got := h.current().cmd.Process.Pid; got != pid {
		t.Errorf("pid %d after the reload, want %d", got, pid)
	}
	if v := h.metric("relaycar_config_last_reload_successful"); v != 1 {
		t.Errorf("last_reload_successful = %v", v)
	}
	ts := h.metric("relaycar_config_last_reload_success_timestamp_seconds")

	// An invalid config is refused; the running one keeps delivering.
	if err := os.WriteFile(h.cfgPath, []byte(mustRead(t, h.cfgPath)+"upstreamz: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.current().cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the failed reload", func() bool { return h.metric("relaycar_config_last_reload_successful") == 0 })
	if !h.logContains("upstreamz: unknown key") {
		t.Error("the failed reload does not log the problem with its YAML path")
	}
	if v := h.metric("relaycar_config_last_reload_success_timestamp_seconds"); v != ts {
		t.Errorf("success timestamp moved on a failed reload: %v → %v", ts, v)
	}
	h.mustSend(sender, []string{"c@example.net"}, message(sender, "c@example.net", 4, "old config still runs"))
	waitFor(t, 10*time.Second, "delivery on the old config", func() bool { return auth.Count() == 3 })
	select {
	case <-h.current().done:
		t.Fatal("relaycar exited")
	default:
	}
}

// The same rotation as a Kubernetes Secret volume does it — a new
// ..<timestamp> directory and a renamed ..data symlink, the visible file
// name unchanged — and no signal: the relay's poll sees it.
func TestReload_PollSeesKubernetesSecretSwap(t *testing.T) {
	t.Parallel()
	auth := testsmtp.Start(t, testsmtp.Options{Users: map[string]string{"relay": "old-password-1"}})
	broken := downUpstream(t, func(string) bool { return false })
	secrets := t.TempDir()
	swap := func(stamp, password string) {
		t.Helper()
		d := filepath.Join(secrets, stamp)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "password"), []byte(password), 0o600); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(secrets, "..data_tmp")
		if err := os.Symlink(stamp, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(secrets, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	swap("..2026_12_01_13_00_00.1", "old-password-1")
	pwFile := filepath.Join(secrets, "password")
	if err := os.Symlink("..data/password", pwFile); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, reloadConfig(auth.Addr, pwFile, broken.Addr), withArgs("--reload-poll", "200ms"))
	h.mustSend(sender, []string{"a@example.net"}, message(sender, "a@example.net", 1, "before"))
	waitFor(t, 10*time.Second, "the first message", func() bool { return auth.Count() == 1 })

	auth.SetUsers(map[string]string{"relay": "new-password-2"})
	swap("..2026_12_01_13_05_00.2", "new-password-2")
	waitFor(t, 5*time.Second, "the poll to reload", func() bool { return h.logContains("upstreams_changed=[smarthost]") })
	h.mustSend(sender, []string{"b@example.net"}, message(sender, "b@example.net", 2, "after the swap"))
	waitFor(t, 10*time.Second, "delivery with the new password", func() bool { return auth.Count() == 2 })
	for _, secret := range []string{"old-password-1", "new-password-2"} {
		if h.logContains(secret) {
			t.Errorf("password %q in the relay's log", secret)
		}
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Reloads while mail flows: each one rebuilds the smarthost (its timeout
// alternates), and not a message is lost or sent twice. The longest gap
// between two deliveries, with and without reloads, is logged: the pause
// a reload costs (README, "Reload").
func TestReload_UnderLoadLosesNothing(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var at []time.Time
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{Data: func(testsmtp.Msg) error {
		mu.Lock()
		at = append(at, time.Now())
		mu.Unlock()
		return nil
	}})
	cfg := func(timeout string) string {
		return fmt.Sprintf(`
upstreams:
  - {name: smarthost, type: smtp, address: %q, tls: none, timeout: %s}
routes:
  - {name: default, upstreams: [smarthost]}
`, sink.Addr, timeout)
	}
	h := newHarness(t, cfg("30s"), withArgs("--reload-poll", "0"))
	run := func(n int, reloads bool) time.Duration {
		mu.Lock()
		at = nil
		mu.Unlock()
		base := sink.Count()
		stop := make(chan struct{})
		var once sync.Once
		stopReloads := func() { once.Do(func() { close(stop) }) }
		t.Cleanup(stopReloads) // also when a wait below fails the test
		done := make(chan struct{})
		if reloads {
			go func() {
				defer close(done)
				// At most 2,400 reloads (a minute): bounded even if stop
				// never comes.
				for i := 0; i < 2400; i++ {
					select {
					case <-stop:
						return
					// Often enough that a quiet machine, which sends the 400 in
					// a quarter of a second, still sees several reloads.
					case <-time.After(25 * time.Millisecond):
					}
					b, err := os.ReadFile(h.cfgPath)
					if err != nil {
						return // the test is over; t.Fatal is not for this goroutine
					}
					text := strings.Replace(string(b), map[bool]string{true: "timeout: 30s", false: "timeout: 31s"}[i%2 == 0],
						map[bool]string{true: "timeout: 31s", false: "timeout: 30s"}[i%2 == 0], 1)
					// Renamed into place, so a reload never reads half a file.
					os.WriteFile(h.cfgPath+".new", []byte(text), 0o600)
					os.Rename(h.cfgPath+".new", h.cfgPath)
					h.current().cmd.Process.Signal(syscall.SIGHUP)
				}
			}()
		} else {
			close(done)
		}
		var wg sync.WaitGroup
		for c := range 4 {
			wg.Go(func() {
				for i := range n / 4 {
					r := fmt.Sprintf("u%d-%d@example.net", c, i)
					h.mustSend(sender, []string{r}, message(sender, r, i, "load"))
				}
			})
		}
		wg.Wait()
		waitFor(t, 30*time.Second, "every message delivered", func() bool { return sink.Count() >= base+n })
		stopReloads()
		<-done
		time.Sleep(300 * time.Millisecond)
		if got := sink.Count() - base; got != n {
			t.Errorf("%d deliveries for %d messages", got, n)
		}
		mu.Lock()
		defer mu.Unlock()
		var gap time.Duration
		for i := 1; i < len(at); i++ {
			gap = max(gap, at[i].Sub(at[i-1]))
		}
		return gap
	}
	quiet := run(400, false)
	busy := run(400, true)
	h.mu.Lock()
	reloads := strings.Count(strings.Join(h.lines, "\n"), "config reloaded")
	h.mu.Unlock()
	if reloads < 3 {
		t.Errorf("only %d reloads happened during the run", reloads)
	}
	t.Logf("longest gap between deliveries: %v without reloads, %v with %d reloads rebuilding the upstream", quiet, busy, reloads)
}

// AUTH cannot be switched on by a reload (the listener was set up without
// it): adding a users file is logged as needing a restart and mail from
// the same clients keeps flowing, instead of every MAIL getting 530.
func TestReload_AddingAuthNeedsARestart(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	base := fmt.Sprintf(`
upstreams:
  - {name: smarthost, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [smarthost]}
`, sink.Addr)
	h := newHarness(t, base, withArgs("--reload-poll", "0"))
	users := filepath.Join(t.TempDir(), "users")
	// htpasswd bcrypt line for user "app", password "secret"
	if err := os.WriteFile(users, []byte("app:$2y$05$0U7Ow7y7F4s3Q1n0Q3eT1eE9lq7Q1M2mWw2kV9Yq1m3kQ9l3c8C6a\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	text := mustRead(t, h.cfgPath)
	text = strings.Replace(text, "listen:\n", "listen:\n    auth:\n        users_file: "+users+"\n", 1)
	if err := os.WriteFile(h.cfgPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	h.current().cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the restart warning", func() bool { return h.logContains("needs a restart") && h.logContains("listen.auth") })
	h.mustSend(sender, []string{"a@example.net"}, message(sender, "a@example.net", 1, "no AUTH, as before"))
	waitFor(t, 10*time.Second, "delivery", func() bool { return sink.Count() == 1 })
}

// SIZE is the largest message some route can deliver: an upstream's
// max_message_bytes raised by a reload lets bigger messages in at once,
// EHLO advertises the new limit, and lowering it refuses them again
// (before, both stayed at the values of the start, without a word).
func TestReload_SizeFollowsUpstreamLimits(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	base := fmt.Sprintf(`
upstreams:
  - {name: smarthost, type: smtp, address: %q, tls: none, max_message_bytes: 2000}
routes:
  - {name: default, upstreams: [smarthost]}
`, sink.Addr)
	h := newHarness(t, base, withArgs("--reload-poll", "0"))
	big := message(sender, "a@example.net", 1, "five kilobytes") + strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n", 80)
	size := func() string {
		c := h.dialRaw()
		c.expect(220)
		ehlo := c.cmd(250, "EHLO tests.local")
		for _, l := range strings.Split(ehlo, "\n") {
			if strings.HasPrefix(l, "SIZE ") {
				return l
			}
		}
		return ""
	}
	if got := size(); got != "SIZE 2000" {
		t.Fatalf("EHLO before the reload: %q, want SIZE 2000", got)
	}
	if _, err := h.send(sender, []string{"a@example.net"}, big); err == nil || !strings.Contains(err.Error(), "552") {
		t.Fatalf("a 5 KB message under SIZE 2000: %v, want 552", err)
	}
	reload := func(from, to, wantLog string) {
		t.Helper()
		text := mustRead(t, h.cfgPath)
		if err := os.WriteFile(h.cfgPath, []byte(strings.Replace(text, from, to, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		h.current().cmd.Process.Signal(syscall.SIGHUP)
		waitFor(t, 5*time.Second, "the reload", func() bool { return h.logContains(wantLog) })
	}
	reload("max_message_bytes: 2000", "max_message_bytes: 1048576", "size_limit=1048576")
	if got := size(); got != "SIZE 1048576" {
		t.Errorf("EHLO after raising the limit: %q, want SIZE 1048576", got)
	}
	h.mustSend(sender, []string{"a@example.net"}, big)
	waitFor(t, 10*time.Second, "delivery", func() bool { return sink.Count() == 1 })
	reload("max_message_bytes: 1048576", "max_message_bytes: 3000", "size_limit=3000")
	if _, err := h.send(sender, []string{"a@example.net"}, big); err == nil || !strings.Contains(err.Error(), "552") {
		t.Errorf("a 5 KB message after lowering the limit to 3000: %v, want 552", err)
	}
	if h.logContains("needs a restart") {
		t.Error("a size change was logged as needing a restart")
	}
}

// holdSpoolLock takes the spool's lock as `relaycar queue` would, so a
// relay starting meanwhile waits for it; release lets it go.
func holdSpoolLock(t *testing.T, spoolDir string) (release func()) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(spoolDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() { once.Do(func() { f.Close() }) }
	t.Cleanup(release)
	return release
}

// A config change, or a SIGHUP, while the relay starts (here: waiting for
// the spool lock; in real life also loading a large spool) is applied once
// it is up, instead of being lost to a baseline taken after the start.
func TestReload_ChangeDuringStartIsApplied(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	base := fmt.Sprintf(`
upstreams:
  - {name: smarthost, type: smtp, address: %q, tls: none, timeout: 30s}
routes:
  - {name: default, upstreams: [smarthost]}
`, sink.Addr)
	for _, tc := range []struct {
		name   string
		args   []string
		during func(h *harness, pid int)
	}{
		{"poll", []string{"--reload-poll", "100ms"}, func(h *harness, _ int) {
			rewriteConfig(t, h, "timeout: 30s", "timeout: 31s")
		}},
		{"SIGHUP", []string{"--reload-poll", "0"}, func(h *harness, pid int) {
			rewriteConfig(t, h, "timeout: 30s", "timeout: 31s")
			syscall.Kill(pid, syscall.SIGHUP)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, base, withArgs(tc.args...))
			if code, _ := h.sigterm(); code != 0 {
				t.Fatalf("first stop: exit %d", code)
			}
			release := holdSpoolLock(t, h.spool)
			started := make(chan error, 1)
			go func() { started <- h.start() }()
			waitFor(t, 10*time.Second, "the relay waiting for the lock", func() bool { return h.logContains("spool locked by another process") })
			tc.during(h, h.current().cmd.Process.Pid)
			time.Sleep(300 * time.Millisecond) // the change lands well inside the wait
			release()
			if err := <-started; err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, "the change applied", func() bool {
				return h.logContains(`msg="config reloaded" upstreams_changed=[smarthost]`)
			})
		})
	}
}

// rewriteConfig replaces old with new in the harness's relay.yaml, by a
// rename as an editor or a ConfigMap update would.
func rewriteConfig(t *testing.T, h *harness, old, new string) {
	t.Helper()
	b, err := os.ReadFile(h.cfgPath)
	if err != nil {
		t.Error(err)
		return
	}
	if !strings.Contains(string(b), old) {
		t.Errorf("relay.yaml has no %q", old)
		return
	}
	tmp := h.cfgPath + ".new"
	if err := os.WriteFile(tmp, []byte(strings.Replace(string(b), old, new, 1)), 0o600); err != nil {
		t.Error(err)
		return
	}
	if err := os.Rename(tmp, h.cfgPath); err != nil {
		t.Error(err)
	}
}
