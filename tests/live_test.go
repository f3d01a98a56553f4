package tests

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
)

// startSESEmulator runs npm aws-ses-v2-local (installed by
// scripts/ses-emulator.sh) on a free loopback port with account as its
// GetAccount answer (AWS_SES_ACCOUNT) and returns its base URL.
func startSESEmulator(t *testing.T, account string) string {
	t.Helper()
	dir := os.Getenv("RELAYCAR_SES_EMULATOR_DIR")
	if dir == "" {
		dir = filepath.Join(repoRoot, ".cache", "npm")
	}
	cli := filepath.Join(dir, "node_modules", "aws-ses-v2-local", "dist", "cli.js")
	if _, err := os.Stat(cli); err != nil {
		t.Fatalf("SES emulator (npm aws-ses-v2-local@2.10.2) is not installed at %s: run `scripts/ses-emulator.sh install`", cli)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node is not on PATH; the SES emulator needs it: %v", err)
	}
	for try := 0; try < 3; try++ {
		_, port, _ := net.SplitHostPort(freeAddr(t))
		cmd := exec.Command(node, cli, "--host", "127.0.0.1", "--port", port)
		cmd.Env = append(os.Environ(), "AWS_SES_ACCOUNT="+account)
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start SES emulator: %v", err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		stop := func() { cmd.Process.Kill(); <-exited }
		base := "http://127.0.0.1:" + port
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			select {
			case <-exited:
				deadline = time.Time{}
				continue
			default:
			}
			if resp, err := http.Get(base + "/health-check"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					t.Cleanup(stop)
					return base
				}
			}
		}
		stop()
	}
	t.Fatal("SES emulator did not become healthy")
	return ""
}

// sesAccount is a GetAccount answer with every field the emulator's schema
// requires.
func sesAccount(production bool, max24, rate, sent float64) string {
	return fmt.Sprintf(`{"DedicatedIpAutoWarmupEnabled":false,"Details":{"AdditionalContactEmailAddresses":[],"ContactLanguage":"EN",`+
		`"MailType":"TRANSACTIONAL","ReviewDetails":{"CaseId":"","Status":"GRANTED"},"UseCaseDescription":"","WebsiteURL":"https://example.com"},`+
		`"EnforcementStatus":"HEALTHY","ProductionAccessEnabled":%t,"SendingEnabled":true,`+
		`"SendQuota":{"Max24HourSend":%g,"MaxSendRate":%g,"SentLast24Hours":%g},"SuppressionAttributes":{"SuppressedReasons":[]}}`,
		production, max24, rate, sent)
}

// sesStored is how many emails the emulator took.
func sesStored(t *testing.T, base string) int {
	t.Helper()
	resp, err := http.Get(base + "/store")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		Emails []json.RawMessage `json:"emails"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return len(st.Emails)
}

// outboxCount is how many messages a file upstream wrote into dir.
func outboxCount(dir string) int {
	m, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	return len(m)
}

const (
	liveSESKeyID  = "AKIDRELAYCARLIVE0001"
	liveSESSecret = "ses-live-secret-Qm47Zt0pXv9W"
)

// quotaConfig is SES with from_provider in front of a file upstream.
func quotaConfig(ses, outbox string, perSecond float64, maxWait string) string {
	return fmt.Sprintf(`
upstreams:
  - name: ses
    type: ses
    region: us-east-1
    access_key_id: %s
    secret_access_key: %s
    endpoint: %q
    rate_limit: {per_second: %g, burst: 1, max_wait: %s, from_provider: true}
  - {name: outbox, type: file, dir: %q}
routes:
  - {name: default, upstreams: [ses, outbox], strategy: failover}
`, liveSESKeyID, liveSESSecret, ses, perSecond, maxWait, outbox)
}

// A sandbox account whose MaxSendRate (one per 10 s) is below per_second:
// the relay warns, exports the quota, and the second message of a burst
// finds no token at SES within max_wait and fails over.
func TestQuota_SESSandboxCapsRate(t *testing.T) {
	t.Parallel()
	ses := startSESEmulator(t, sesAccount(false, 200, 0.1, 0))
	outbox := t.TempDir()
	h := newHarness(t, quotaConfig(ses, outbox, 50, "200ms"))
	for i := range 2 {
		h.mustSend("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", i, "quota"))
	}
	h.waitSpoolEmpty(10 * time.Second)
	if n, m := sesStored(t, ses), outboxCount(outbox); n != 1 || m != 1 {
		t.Errorf("SES took %d, the outbox %d; want 1 and 1 (the rate capped at 0.1/s)", n, m)
	}
	if v := h.metric("relaycar_upstream_skipped_total", "upstream=ses", "reason=rate_limited"); v != 1 {
		t.Errorf("skipped{ses,rate_limited} = %v, want 1", v)
	}
	for _, c := range []struct {
		name string
		want float64
	}{
		{"relaycar_upstream_quota_max_send_rate", 0.1},
		{"relaycar_upstream_sandbox", 1},
		{"relaycar_upstream_quota_remaining_24h", 199}, // our own send counted
	} {
		if v := h.metric(c.name, "upstream=ses"); v != c.want {
			t.Errorf("%s{upstream=ses} = %v, want %v", c.name, v, c.want)
		}
	}
	if !h.logContains("provider account is in the sandbox") {
		t.Error("no sandbox warning in the log")
	}
}

// The 24-hour quota: used up at start (SentLast24Hours = Max24HourSend),
// and used up by the relay's own sends between two reads. Either way SES
// is skipped with quota_exhausted and the mail fails over.
func TestQuota_SESExhaustedFailsOver(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name               string
		max, sent          float64
		msgs, toSES, toBox int
	}{
		{"used up at start", 5, 5, 1, 0, 1},
		{"used up by our sends", 3, 2, 2, 1, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ses := startSESEmulator(t, sesAccount(true, tc.max, 50, tc.sent))
			outbox := t.TempDir()
			h := newHarness(t, quotaConfig(ses, outbox, 50, "1s"))
			for i := range tc.msgs {
				h.mustSend("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", i, "quota"))
				h.waitSpoolEmpty(10 * time.Second)
			}
			if n, m := sesStored(t, ses), outboxCount(outbox); n != tc.toSES || m != tc.toBox {
				t.Errorf("SES took %d, the outbox %d; want %d and %d", n, m, tc.toSES, tc.toBox)
			}
			if v := h.metric("relaycar_upstream_skipped_total", "upstream=ses", "reason=quota_exhausted"); v != 1 {
				t.Errorf("skipped{ses,quota_exhausted} = %v, want 1", v)
			}
			if v := h.metric("relaycar_upstream_quota_remaining_24h", "upstream=ses"); v != 0 {
				t.Errorf("remaining_24h = %v, want 0", v)
			}
			if v := h.metric("relaycar_upstream_sandbox", "upstream=ses"); v != 0 {
				t.Errorf("sandbox = %v, want 0 (production access)", v)
			}
			if !h.logContains("provider 24-hour quota used up") {
				t.Error("no quota-exhausted line in the log")
			}
		})
	}
}

// liveFakes are the provider fakes of the check --live test; each records
// what it was asked, so the test can prove no mail was sent.
type liveFakes struct {
	sendgrid, sendgridBad, mailgun, smtp2go, smtp2goBad *fakes.HTTP
}

const (
	liveSGKey      = "SG.live-good-key.0123456789abcdef"
	liveSGBadKey   = "SG.live-revoked-key.0123456789abcdef"
	liveMGKey      = "key-live-3f9a7c1e5b2d4068a1c3e5f7"
	live2GOKey     = "api-0A1B2C3D4E5F60718293A4B5C6D7E8F9"
	live2GOBadKey  = "api-FFFFEEEEDDDDCCCCBBBBAAAA99998888"
	liveSMTPPass   = "smarthost-pass-Vb83kQz1"
	liveSMTPBadPwd = "smarthost-wrong-Hd62pLm0"
)

func startLiveFakes(t *testing.T) liveFakes {
	sendgrid := func(good bool) *fakes.HTTP {
		return fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
			if !good || r.Header.Get("Authorization") != "Bearer "+liveSGKey {
				return fakes.JSON(401, `{"errors":[{"field":null,"message":"The provided authorization grant is invalid, expired, or revoked"}]}`)
			}
			if r.Method == http.MethodGet && r.Path == "/v3/scopes" {
				return fakes.JSON(200, `{"scopes":["mail.send","stats.read"]}`)
			}
			return fakes.JSON(404, `{"errors":[{"message":"not found"}]}`)
		})
	}
	smtp2go := func(key string) *fakes.HTTP {
		return fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
			if r.Header.Get("X-Smtp2go-Api-Key") != live2GOKey {
				return fakes.JSON(401, `{"request_id":"r","data":{"error_code":"E_ApiResponseCodes.API_KEY_INVALID","error":"Invalid API key"}}`)
			}
			if r.Method == http.MethodPost && r.Path == "/v3/stats/email_cycle" {
				return fakes.JSON(200, `{"request_id":"r","data":{"cycle_start":"2026-11-01","cycle_end":"2026-12-01","cycle_max":1000,"cycle_used":1,"cycle_remaining":999}}`)
			}
			return fakes.JSON(404, `{"request_id":"r","data":{"error":"not found"}}`)
		})
	}
	mailgun := fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
		user, pass, ok := (&http.Request{Header: r.Header}).BasicAuth()
		if !ok || user != "api" || pass != liveMGKey {
			return fakes.JSON(401, `{"message":"Invalid private key"}`)
		}
		if r.Method == http.MethodGet && r.Path == "/v4/domains/"+mgDomain {
			return fakes.JSON(200, `{"domain":{"name":"`+mgDomain+`","state":"active","type":"custom","is_disabled":false,"created_at":"Mon, 01 Dec 2025 10:00:00 UTC"}}`)
		}
		return fakes.JSON(404, `{"message":"not found"}`)
	})
	return liveFakes{sendgrid: sendgrid(true), sendgridBad: sendgrid(false), mailgun: mailgun, smtp2go: smtp2go(live2GOKey), smtp2goBad: smtp2go(live2GOBadKey)}
}

// checkLiveRun writes cfg and runs `relaycar check --live` on it.
func checkLiveRun(t *testing.T, cfg string) (int, []string, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "relay.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runCLI(t, dir, nil, "check", "--live", "--config", "relay.yaml")
	return code, strings.Split(strings.TrimRight(out, "\n"), "\n"), out
}

func TestCheckLive_Upstreams(t *testing.T) {
	t.Parallel()
	f := startLiveFakes(t)
	sink := testsmtp.Start(t, testsmtp.Options{Users: map[string]string{"relay": liveSMTPPass}})
	var emu struct {
		once sync.Once
		url  string
	}
	sesURL := func() string {
		emu.once.Do(func() { emu.url = startSESEmulator(t, sesAccount(false, 200, 1, 0)) })
		return emu.url
	}
	closed := freeAddr(t) // nothing listens there once freeAddr returns
	outbox := t.TempDir()

	good := fmt.Sprintf(`
upstreams:
  - {name: ses, type: ses, region: us-east-1, access_key_id: %s, secret_access_key: %s, endpoint: %q}
  - {name: sendgrid, type: sendgrid, api_key: %s, endpoint: %q}
  - {name: mailgun, type: mailgun, domain: %s, api_key: %s, endpoint: %q}
  - {name: smtp2go, type: smtp2go, api_key: %s, endpoint: %q}
  - {name: smarthost, type: smtp, address: %q, tls: none, username: relay, password: %s}
  - {name: outbox, type: file, dir: %q}
routes:
  - {name: default, upstreams: [ses, sendgrid, mailgun, smtp2go, smarthost, outbox]}
`, liveSESKeyID, liveSESSecret, sesURL(), liveSGKey, f.sendgrid.URL, mgDomain, liveMGKey, f.mailgun.URL,
		live2GOKey, f.smtp2go.URL, sink.Addr, liveSMTPPass, outbox)

	bad := fmt.Sprintf(`
upstreams:
  - {name: sendgrid, type: sendgrid, api_key: %s, endpoint: %q}
  - {name: smtp2go, type: smtp2go, api_key: %s, endpoint: %q}
  - {name: smarthost, type: smtp, address: %q, tls: none, username: relay, password: %s}
  - {name: gone, type: smtp, address: %q, tls: none, timeout: 2s}
  - {name: ses, type: ses, region: us-east-1, access_key_id: %s, secret_access_key: %s, endpoint: %q}
routes:
  - {name: default, upstreams: [sendgrid, smtp2go, smarthost, gone, ses]}
`, liveSGBadKey, f.sendgridBad.URL, live2GOBadKey, f.smtp2goBad.URL, sink.Addr, liveSMTPBadPwd, closed,
		liveSESKeyID, liveSESSecret, sesURL())

	secrets := []string{liveSESKeyID, liveSESSecret, liveSGKey, liveSGBadKey, liveMGKey, live2GOKey, live2GOBadKey, liveSMTPPass, liveSMTPBadPwd}
	for _, tc := range []struct {
		name, cfg string
		code      int
		lines     []string // prefixes, in order, after the config line
	}{
		{"good", good, 0, []string{
			"upstreams[0] (ses): ok (sandbox: only verified recipients, max 1/s, 0 of 200 sent in 24 h)",
			"upstreams[1] (sendgrid): ok (key valid, mail.send scope)",
			"upstreams[2] (mailgun): ok (key valid, domain " + mgDomain + " active)",
			"upstreams[3] (smtp2go): ok (key valid, 999 of 1000 emails left this cycle)",
			"upstreams[4] (smarthost): ok (connected, no TLS, AUTH as relay)",
			"upstreams[5] (outbox): ok (dir " + outbox + " writable)",
		}},
		{"wrong keys, unreachable", bad, 1, []string{
			"upstreams[0] (sendgrid): provider_fault (401): The provided authorization grant is invalid",
			"upstreams[1] (smtp2go): provider_fault (401 API_KEY_INVALID): HTTP 401: Invalid API key",
			"upstreams[2] (smarthost): provider_fault (535",
			"upstreams[3] (gone): transient: connect: ",
			"upstreams[4] (ses): ok (sandbox: only verified recipients",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, lines, out := checkLiveRun(t, tc.cfg)
			if code != tc.code {
				t.Errorf("exit code %d, want %d", code, tc.code)
			}
			if len(lines) != len(tc.lines)+1 || !strings.HasSuffix(lines[0], ": ok ("+strconv.Itoa(len(tc.lines))+" upstreams, 1 routes)") {
				t.Fatalf("want the config line and one line per upstream, got:\n%s", out)
			}
			for i, want := range tc.lines {
				if !strings.HasPrefix(lines[i+1], want) {
					t.Errorf("line %d = %q, want it to start %q", i+1, lines[i+1], want)
				}
			}
			for _, s := range secrets {
				if strings.Contains(out, s) {
					t.Errorf("output carries the secret %q:\n%s", s, out)
				}
			}
		})
	}

	// Nothing was sent: the fakes saw only their read-only call, the sink
	// and the emulator no message, the outbox no file.
	for name, fk := range map[string]*fakes.HTTP{"sendgrid": f.sendgrid, "sendgrid (bad key)": f.sendgridBad, "mailgun": f.mailgun,
		"smtp2go": f.smtp2go, "smtp2go (bad key)": f.smtp2goBad} {
		for _, r := range fk.Requests() {
			if r.Path == sendGridPath || strings.HasSuffix(r.Path, "/messages.mime") || strings.HasPrefix(r.Path, "/v3/email/") {
				t.Errorf("%s fake got a send request: %s %s", name, r.Method, r.Path)
			}
		}
		if len(fk.Requests()) != 1 {
			t.Errorf("%s fake got %d requests, want 1", name, len(fk.Requests()))
		}
	}
	if sink.Count() != 0 {
		t.Errorf("the smarthost received %d messages", sink.Count())
	}
	if n := sesStored(t, sesURL()); n != 0 {
		t.Errorf("the SES emulator stored %d emails", n)
	}
	if n := outboxCount(outbox); n != 0 {
		t.Errorf("the outbox has %d messages", n)
	}
}
