package upstreams

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
)

// SESAccountJSON is a GetAccount answer in the shape aws-ses-v2-local's
// schema demands (every field present), for AWS_SES_ACCOUNT.
func sesAccountJSON(production, enabled bool, max24, rate, sent float64) string {
	return fmt.Sprintf(`{"DedicatedIpAutoWarmupEnabled":false,"Details":{"AdditionalContactEmailAddresses":[],"ContactLanguage":"EN",`+
		`"MailType":"TRANSACTIONAL","ReviewDetails":{"CaseId":"","Status":"GRANTED"},"UseCaseDescription":"","WebsiteURL":"https://example.com"},`+
		`"EnforcementStatus":"HEALTHY","ProductionAccessEnabled":%t,"SendingEnabled":%t,`+
		`"SendQuota":{"Max24HourSend":%g,"MaxSendRate":%g,"SentLast24Hours":%g},"SuppressionAttributes":{"SuppressedReasons":[]}}`,
		production, enabled, max24, rate, sent)
}

// liveOf runs the top-level CheckLive on c, as `relaycar check --live` does.
func liveOf(t *testing.T, c Config) (string, error) {
	t.Helper()
	return CheckLive(context.Background(), c, Deps{Hostname: "relay.test"})
}

func TestSES_QuotaFromEmulator(t *testing.T) {
	t.Parallel()
	base := startSESEmulatorEnv(t, "AWS_SES_ACCOUNT="+sesAccountJSON(false, true, 200, 1, 12))
	q, err := newTestSES(t, base).Quota(context.Background())
	if err != nil {
		t.Fatalf("Quota: %v", err)
	}
	want := Quota{MaxSendRate: 1, Max24HourSend: 200, SentLast24Hours: 12, Sandbox: true, SendingEnabled: true, Enforcement: "HEALTHY"}
	if q != want {
		t.Errorf("Quota = %+v, want %+v", q, want)
	}
	if q.Remaining24h(8) != 180 || q.Exhausted(187) || !q.Exhausted(188) {
		t.Errorf("Remaining24h(8) = %v, Exhausted(187/188) = %v/%v", q.Remaining24h(8), q.Exhausted(187), q.Exhausted(188))
	}
}

func TestCheckLive_SESEmulator(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, account string
		want          string // in the summary, or in the problem when problem
		problem       bool
	}{
		{"production", sesAccountJSON(true, true, 50000, 14, 10), "production access, max 14/s, 10 of 50000 sent in 24 h", false},
		// The sandbox is a state staging accounts are in on purpose: ok, said first.
		{"sandbox", sesAccountJSON(false, true, 200, 1, 0), "sandbox: only verified recipients", false},
		{"sending disabled", sesAccountJSON(true, false, 50000, 14, 0), "sending is disabled", true},
		{"quota used up", sesAccountJSON(true, true, 200, 1, 200), "24-hour quota used up: 200 of 200 sent", true},
		{"unlimited", sesAccountJSON(true, true, -1, 100, 5), "no 24-hour quota", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			base := startSESEmulatorEnv(t, "AWS_SES_ACCOUNT="+tc.account)
			detail, err := liveOf(t, Config{Name: "ses", Type: "ses", Region: "us-east-1",
				AccessKeyID: sesTestKeyID, SecretAccessKey: sesTestSecret, Endpoint: base, Timeout: 5 * time.Second})
			got := detail
			if err != nil {
				got = err.Error()
			}
			if (err != nil) != tc.problem || !strings.Contains(got, tc.want) {
				t.Errorf("CheckLive = %q, %v; want problem=%t containing %q", detail, err, tc.problem, tc.want)
			}
		})
	}
}

// The key was revoked in IAM: SES answers 403 UnrecognizedClientException.
func TestCheckLive_SESWrongKey(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
		return sesError(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
	})
	_, err := liveOf(t, Config{Name: "ses", Type: "ses", Region: "us-east-1",
		AccessKeyID: sesTestKeyID, SecretAccessKey: sesTestSecret, Endpoint: f.URL})
	if ClassOf(err) != ProviderFault || !strings.Contains(err.Error(), "UnrecognizedClientException") {
		t.Errorf("err = %v, want provider_fault UnrecognizedClientException", err)
	}
	fakes.AssertNoSecret(t, err, nil, sesTestKeyID, sesTestSecret)
	reqs := f.Requests()
	if len(reqs) != 1 || reqs[0].Method != http.MethodGet || reqs[0].Path != "/v2/email/account" {
		t.Errorf("requests = %+v, want one GET /v2/email/account", reqs)
	}
}

func TestCheckLive_SendGrid(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		reply   fakes.Reply
		want    string
		problem bool
	}{
		{"good", fakes.JSON(200, `{"scopes":["mail.send","alerts.read"]}`), "key valid, mail.send scope", false},
		{"no mail.send", fakes.JSON(200, `{"scopes":["stats.read"]}`), "lacks the mail.send scope", true},
		{"wrong key", fakes.JSON(401, `{"errors":[{"field":null,"message":"authorization required"}]}`), "provider_fault (401): authorization required", true},
		{"forbidden", fakes.JSON(403, `{"errors":[{"field":null,"message":"access forbidden"}]}`), "provider_fault (403)", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return tc.reply })
			detail, err := liveOf(t, Config{Name: "sendgrid", Type: "sendgrid", APIKey: sgTestKey, Endpoint: f.URL})
			checkLiveResult(t, detail, err, tc.want, tc.problem)
			fakes.AssertNoSecret(t, err, nil, sgTestKey)
			reqs := f.Requests()
			if len(reqs) != 1 || reqs[0].Method != http.MethodGet || reqs[0].Path != "/v3/scopes" ||
				reqs[0].Header.Get("Authorization") != "Bearer "+sgTestKey {
				t.Errorf("requests = %+v, want one GET /v3/scopes with the bearer key", reqs)
			}
		})
	}
}

func TestCheckLive_Mailgun(t *testing.T) {
	t.Parallel()
	domain := func(state, typ string) fakes.Reply {
		return fakes.JSON(200, `{"domain":{"name":"`+mailgunTestDomain+`","state":"`+state+`","type":"`+typ+`","is_disabled":false,`+
			`"smtp_password":"pw-not-for-printing","created_at":"Mon, 01 Dec 2025 10:00:00 UTC"},"receiving_dns_records":[],"sending_dns_records":[]}`)
	}
	refused := fakes.JSON(401, `{"message":"Invalid private key"}`)
	// A domain sending key: refused the domain read, taken by the send
	// endpoint, which then finds the request incomplete.
	sendingKey := func(_ int, r fakes.Request) fakes.Reply {
		if r.Method == http.MethodPost {
			return fakes.JSON(400, `{"message":"to parameter is missing"}`)
		}
		return refused
	}
	always := func(rep fakes.Reply) func(int, fakes.Request) fakes.Reply {
		return func(int, fakes.Request) fakes.Reply { return rep }
	}
	cases := []struct {
		name    string
		respond func(int, fakes.Request) fakes.Reply
		want    string
		problem bool
	}{
		{"good", always(domain("active", "custom")), "key valid, domain mg.example.com active", false},
		{"sandbox domain", always(domain("active", "sandbox")), "sandbox domain: only authorized recipients", false},
		{"unverified", always(domain("unverified", "custom")), "is unverified", true},
		{"sending key", sendingKey, "domain sending key valid", false},
		{"wrong key", always(refused), "provider_fault (401): HTTP 401: Invalid private key", true},
		{"unknown domain", always(fakes.JSON(404, `{"message":"Domain not found"}`)), "not in this account", true},
	}
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("api:"+mailgunTestKey))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, tc.respond)
			detail, err := liveOf(t, Config{Name: "mailgun", Type: "mailgun", Domain: mailgunTestDomain, APIKey: mailgunTestKey, Endpoint: f.URL})
			checkLiveResult(t, detail, err, tc.want, tc.problem)
			fakes.AssertNoSecret(t, err, nil, mailgunTestKey, "pw-not-for-printing")
			if strings.Contains(detail, "pw-not-for-printing") {
				t.Errorf("summary carries the domain's SMTP password: %q", detail)
			}
			reqs := f.Requests()
			if len(reqs) == 0 || reqs[0].Method != http.MethodGet || reqs[0].Path != "/v4/domains/"+mailgunTestDomain ||
				reqs[0].Header.Get("Authorization") != auth {
				t.Fatalf("requests = %+v, want GET /v4/domains/%s with basic auth first", reqs, mailgunTestDomain)
			}
			for _, r := range reqs[1:] {
				parts, perr := fakes.MultipartForm(r)
				if r.Method != http.MethodPost || r.Path != "/v3/"+mailgunTestDomain+"/messages.mime" || perr != nil || len(parts) != 0 ||
					r.Header.Get("Authorization") != auth {
					t.Errorf("probe %s %s with %d parts (%v): want an empty messages.mime form, nothing to send", r.Method, r.Path, len(parts), perr)
				}
			}
		})
	}
}

func TestCheckLive_SMTP2GO(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		reply   fakes.Reply
		want    string
		problem bool
	}{
		{"good", fakes.JSON(200, `{"request_id":"r1","data":{"cycle_start":"2026-11-01","cycle_end":"2026-12-01","cycle_max":1000,"cycle_used":10,"cycle_remaining":990}}`),
			"key valid, 990 of 1000 emails left this cycle", false},
		{"allowance used", fakes.JSON(200, `{"request_id":"r1","data":{"cycle_end":"2026-12-01","cycle_max":1000,"cycle_used":1000,"cycle_remaining":0}}`),
			"monthly allowance used up", true},
		// A key limited to sending: valid, but it may not read stats.
		{"send-only key", fakes.JSON(403, `{"request_id":"r1","data":{"error_code":"E_ApiResponseCodes.ENDPOINT_PERMISSION_DENIED","error":"permission denied"}}`),
			"key valid (it may not read stats", false},
		{"wrong key", fakes.JSON(401, `{"request_id":"r1","data":{"error_code":"E_ApiResponseCodes.API_KEY_INVALID","error":"The API key is invalid"}}`),
			"provider_fault (401 API_KEY_INVALID)", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return tc.reply })
			detail, err := liveOf(t, Config{Name: "smtp2go", Type: "smtp2go", APIKey: smtp2goTestKey, Endpoint: f.URL})
			checkLiveResult(t, detail, err, tc.want, tc.problem)
			fakes.AssertNoSecret(t, err, nil, smtp2goTestKey)
			reqs := f.Requests()
			if len(reqs) != 1 || reqs[0].Method != http.MethodPost || reqs[0].Path != "/v3/stats/email_cycle" ||
				reqs[0].Header.Get("X-Smtp2go-Api-Key") != smtp2goTestKey {
				t.Errorf("requests = %+v, want one POST /v3/stats/email_cycle with the key header", reqs)
			}
		})
	}
}

func TestCheckLive_SMTP(t *testing.T) {
	t.Parallel()
	const pass = "smtp-pass-7Hq2ZkR9wX"
	srv := testsmtp.Start(t, testsmtp.Options{Users: map[string]string{"relay": pass}})
	closed := closedPort(t)
	cases := []struct {
		name, addr, password, want string
		problem                    bool
	}{
		{"good", srv.Addr, pass, "connected, no TLS, AUTH as relay", false},
		{"wrong password", srv.Addr, "wrong-pass-0123456789", "provider_fault (535", true},
		{"unreachable", closed, pass, "connect:", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			detail, err := liveOf(t, Config{Name: "smarthost", Type: "smtp", Address: tc.addr, TLS: TLSNone,
				Username: "relay", Password: Secret(tc.password), Timeout: 2 * time.Second})
			checkLiveResult(t, detail, err, tc.want, tc.problem)
			fakes.AssertNoSecret(t, err, nil, pass, tc.password)
		})
	}
	if n := srv.Count(); n != 0 {
		t.Errorf("the smarthost received %d messages; a live check sends none", n)
	}
}

func TestCheckLive_MSGraphToken(t *testing.T) {
	t.Parallel()
	ts := graphTokens(t)
	detail, err := liveOf(t, Config{Name: "graph", Type: "msgraph", TenantID: "contoso.onmicrosoft.com", ClientID: testClientID,
		ClientSecret: testClientSecret, TokenURL: ts.URL, Sender: "relay@contoso.com"})
	checkLiveResult(t, detail, err, "token issued", false)
	_, err = liveOf(t, Config{Name: "graph", Type: "msgraph", TenantID: "contoso.onmicrosoft.com", ClientID: testClientID,
		ClientSecret: "not-the-secret-0123456789", TokenURL: ts.URL, Sender: "relay@contoso.com"})
	if ClassOf(err) != ProviderFault {
		t.Errorf("wrong secret: err = %v, want provider_fault", err)
	}
	fakes.AssertNoSecret(t, err, nil, "not-the-secret-0123456789", testClientSecret)
}

func TestCheckLive_File(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	notDir := filepath.Join(dir, "plain")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, dir, want string
		problem         bool
	}{
		{"writable", dir, "writable", false},
		{"missing, parent writable", filepath.Join(dir, "out", "mail"), "will be created at start", false},
		{"not a directory", notDir, "is not a directory", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			detail, err := liveOf(t, Config{Name: "outbox", Type: "file", Dir: tc.dir})
			checkLiveResult(t, detail, err, tc.want, tc.problem)
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "out")); err == nil {
		t.Error("the live check created the file upstream's directory")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".relaycar-check-*")); len(left) > 0 {
		t.Errorf("probe files left behind: %v", left)
	}
}

func TestValidate_FromProvider(t *testing.T) {
	t.Parallel()
	sg := Config{Name: "sg", Type: "sendgrid", APIKey: "SG.0123456789abcdef0123456789", RateLimit: RateLimit{PerSecond: 5, FromProvider: true}}
	ses := Config{Name: "ses", Type: "ses", Region: "us-east-1", RateLimit: RateLimit{FromProvider: true}}
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{sg, "upstreams[1].rate_limit.from_provider: only type ses reports its quota (SES GetAccount); not type sendgrid"},
		{ses, "upstreams[1].rate_limit.per_second: required with from_provider"},
	} {
		errs := tc.c.Validate("upstreams[1]")
		if len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), tc.want) {
			t.Errorf("%s: Validate = %v, want one error starting %q", tc.c.Type, errs, tc.want)
		}
	}
	ses.RateLimit.PerSecond = 14
	if errs := ses.Validate("upstreams[1]"); len(errs) != 0 {
		t.Errorf("ses with per_second: %v", errs)
	}
}

// checkLiveResult fails unless the check found a problem exactly when
// problem is set, with want in its text.
func checkLiveResult(t *testing.T, detail string, err error, want string, problem bool) {
	t.Helper()
	got := detail
	if err != nil {
		got = err.Error()
	}
	if (err != nil) != problem || !strings.Contains(got, want) {
		t.Errorf("CheckLive = %q, %v; want problem=%t containing %q", detail, err, problem, want)
	}
}

// closedPort is a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
