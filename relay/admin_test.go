package relay

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// adminReq sends one request over the admin socket with the given Host
// and headers, as a browser or a probe would, and returns the status and
// the body.
func adminReq(t *testing.T, tr *testRelay, method, path, host string, hdr map[string]string) (int, string, http.Header) {
	t.Helper()
	var body io.Reader
	if method != http.MethodGet {
		body = strings.NewReader("x=1") // what a cross-site form would post
	}
	req, err := http.NewRequest(method, "http://"+tr.admin+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// startStuckRelay runs a relay whose only upstream keeps failing, with one
// message queued (one failed attempt, next one in an hour), so the queue
// API has something to leak or to drop.
func startStuckRelay(t *testing.T, edit func(*Config)) (*testRelay, *recorder, string) {
	t.Helper()
	var errs []error
	for range 100 {
		errs = append(errs, uerr(upstreams.Transient, "down"))
	}
	a := &recorder{name: "a", errs: errs}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Spool.Retry = policy.RetryConfig{Initial: time.Hour, Max: time.Hour, Multiplier: 1}
		if edit != nil {
			edit(c)
		}
	})
	if err := tr.send("secret-sender@example.com", []string{"secret-rcpt@example.net"}, simpleMsg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first failed attempt", func() bool { return a.calls() == 1 && tr.idle() && tr.ready.Load() })
	envs, err := tr.spool.List()
	if err != nil || len(envs) != 1 {
		t.Fatalf("spool = %v, %v", envs, err)
	}
	return tr, a, envs[0].ID
}

// idle reports that one message is queued and no worker holds it.
func (tr *testRelay) idle() bool {
	busy, _ := tr.queue.state()
	return busy == 0 && tr.queue.len() == 1
}

var withChangeHeader = map[string]string{"X-Relaycar-Request": "1"}

// Models DNS rebinding: a page on evil.example rebinds its name to
// 127.0.0.1, so the operator's browser on this host talks to the admin
// port from loopback, same-origin with the page (it can set any header),
// with Host: evil.example:9025.
func TestAdmin_DNSRebindingHostRefused(t *testing.T) {
	tr, _, id := startStuckRelay(t, func(c *Config) { c.Admin.AllowedHosts = []string{"relaycar.mail.svc"} })
	evil := "evil.example:9025"
	rebind := map[string]string{"X-Relaycar-Request": "1", "Origin": "http://" + evil}
	for _, tc := range []struct {
		method, path string
		hdr          map[string]string
	}{
		{http.MethodGet, "/api/queue", nil},
		{http.MethodGet, "/api/dead", nil},
		{http.MethodGet, "/", nil},
		{http.MethodGet, "/healthz", nil},
		{http.MethodDelete, "/api/queue/" + id, rebind},
		{http.MethodPost, "/api/queue/" + id + "/retry", rebind},
		{http.MethodPost, "/api/queue/retry", rebind},
	} {
		code, body, _ := adminReq(t, tr, tc.method, tc.path, evil, tc.hdr)
		if code != http.StatusForbidden {
			t.Errorf("%s %s with Host %s = %d, want 403", tc.method, tc.path, evil, code)
		}
		if strings.Contains(body, "secret-") {
			t.Errorf("%s %s with Host %s leaks the envelope: %s", tc.method, tc.path, evil, body)
		}
	}
	if envs, _ := tr.spool.List(); len(envs) != 1 {
		t.Fatalf("a rebinding DELETE dropped the queued message: spool = %v", envs)
	}

	// The names the listener really has, and any IP literal (kubelet and
	// Prometheus send the pod IP), still work; a look-alike does not.
	for host, want := range map[string]int{
		tr.admin:                              http.StatusOK,
		"localhost:9025":                      http.StatusOK,
		"LocalHost":                           http.StatusOK,
		"127.0.0.2:9025":                      http.StatusOK,
		"[::1]:9025":                          http.StatusOK,
		"relaycar.mail.svc:9025":              http.StatusOK,
		"relaycar.mail.svc":                   http.StatusOK,
		"Relaycar.Mail.Svc.":                  http.StatusOK,
		"10.1.2.3:9025":                       http.StatusOK,
		"[fd00::5]:9025":                      http.StatusOK,
		"relaycar.mail.svc.evil.example:9025": http.StatusForbidden,
		"localhost.evil.example":              http.StatusForbidden,
		"127.0.0.1.nip.io:9025":               http.StatusForbidden,
	} {
		if code, _, _ := adminReq(t, tr, http.MethodGet, "/api/queue", host, nil); code != want {
			t.Errorf("GET /api/queue with Host %s = %d, want %d", host, code, want)
		}
	}
	// Probes and scrapes by pod IP.
	for _, p := range []string{"/healthz", "/readyz", "/metrics"} {
		if code, _, _ := adminReq(t, tr, http.MethodGet, p, "10.1.2.3:9025", nil); code != http.StatusOK {
			t.Errorf("GET %s with Host 10.1.2.3:9025 (kubelet, Prometheus) = %d, want 200", p, code)
		}
	}
}

// Models a plain cross-site request: a page on evil.example submits a form
// (or a text/plain fetch, which needs no preflight) to
// http://127.0.0.1:9025. The Host is right; the Origin is foreign, and a
// simple request cannot carry X-Relaycar-Request.
func TestAdmin_CrossSiteStateChangesRefused(t *testing.T) {
	tr, a, id := startStuckRelay(t, nil)
	host := tr.admin
	for _, tc := range []struct {
		name, method, path string
		hdr                map[string]string
	}{
		{"text/plain retry from a foreign page", http.MethodPost, "/api/queue/" + id + "/retry",
			map[string]string{"Content-Type": "text/plain", "Origin": "http://evil.example"}},
		{"form retry-all without Origin", http.MethodPost, "/api/queue/retry",
			map[string]string{"Content-Type": "application/x-www-form-urlencoded"}},
		{"drop without the header", http.MethodDelete, "/api/queue/" + id, nil},
		{"header 0", http.MethodPost, "/api/queue/retry", map[string]string{"X-Relaycar-Request": "0"}},
		{"foreign Origin with the header", http.MethodDelete, "/api/queue/" + id,
			map[string]string{"X-Relaycar-Request": "1", "Origin": "http://evil.example:9025"}},
		{"foreign IP-literal Origin with the header", http.MethodPost, "/api/queue/retry",
			map[string]string{"X-Relaycar-Request": "1", "Origin": "http://203.0.113.7"}},
		{"opaque Origin with the header", http.MethodDelete, "/api/queue/" + id,
			map[string]string{"X-Relaycar-Request": "1", "Origin": "null"}},
	} {
		if code, _, _ := adminReq(t, tr, tc.method, tc.path, host, tc.hdr); code != http.StatusForbidden {
			t.Errorf("%s: %s %s = %d, want 403", tc.name, tc.method, tc.path, code)
		}
	}
	if envs, _ := tr.spool.List(); len(envs) != 1 || envs[0].Attempts != 1 || a.calls() != 1 {
		t.Fatalf("a refused request changed the queue: %v, %d calls", envs, a.calls())
	}

	// The CLI (header, no Origin) and a same-origin page (header, its own
	// Origin) may change the queue.
	if code, body, _ := adminReq(t, tr, http.MethodPost, "/api/queue/"+id+"/retry", host, withChangeHeader); code != http.StatusOK {
		t.Fatalf("retry with X-Relaycar-Request = %d %s, want 200", code, body)
	}
	waitFor(t, "the retried attempt", func() bool { return a.calls() == 2 && tr.idle() })
	sameOrigin := map[string]string{"X-Relaycar-Request": "1", "Origin": "http://" + host}
	if code, body, _ := adminReq(t, tr, http.MethodPost, "/api/queue/retry", host, sameOrigin); code != http.StatusOK {
		t.Errorf("retry-all from the same origin = %d %s, want 200", code, body)
	}
	waitFor(t, "the retried-all attempt", func() bool { return a.calls() == 3 && tr.idle() })
	if code, body, _ := adminReq(t, tr, http.MethodDelete, "/api/queue/"+id, host, withChangeHeader); code != http.StatusOK {
		t.Errorf("drop with X-Relaycar-Request = %d %s, want 200", code, body)
	}
	if envs, _ := tr.spool.List(); len(envs) != 0 {
		t.Errorf("spool after drop = %v", envs)
	}
}

// The peer-address rule still holds on top of the Host and header rules:
// the admin port listens on the pod IP for probes and scrapes, and only a
// shell in the pod may change the queue.
func TestAdmin_PeerMustBeLocalForChanges(t *testing.T) {
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	h := tr.api.handler()
	for _, tc := range []struct {
		method, path, remote string
		want                 int
	}{
		{http.MethodPost, "/api/queue/retry", "10.1.2.3:4000", http.StatusForbidden},
		{http.MethodDelete, "/api/queue/abc", "[2001:db8::1]:4000", http.StatusForbidden},
		{http.MethodPost, "/api/queue/abc/retry", "192.168.1.1:4000", http.StatusForbidden},
		{http.MethodPost, "/api/queue/retry", "127.0.0.1:4000", http.StatusOK},
		{http.MethodDelete, "/api/queue/abc", "[::1]:4000", http.StatusNotFound},
		{http.MethodGet, "/api/queue", "10.1.2.3:4000", http.StatusOK},
		{http.MethodGet, "/metrics", "10.1.2.3:4000", http.StatusOK},
	} {
		req, _ := http.NewRequest(tc.method, "http://127.0.0.1:9025"+tc.path, nil)
		req.RemoteAddr = tc.remote
		req.Header.Set("X-Relaycar-Request", "1")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("%s %s from %s = %d, want %d", tc.method, tc.path, tc.remote, rec.Code, tc.want)
		}
	}
}

// Every admin response, refusals and 404s included, tells the browser not
// to sniff types, run scripts, load anything or be framed.
func TestAdmin_SecurityHeadersOnEveryResponse(t *testing.T) {
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	for _, tc := range []struct{ method, path, host string }{
		{http.MethodGet, "/", tr.admin},
		{http.MethodGet, "/api/queue", tr.admin},
		{http.MethodGet, "/api/dead", tr.admin},
		{http.MethodGet, "/metrics", tr.admin},
		{http.MethodGet, "/healthz", tr.admin},
		{http.MethodGet, "/readyz", tr.admin},
		{http.MethodGet, "/no/such/page", tr.admin},
		{http.MethodPost, "/api/queue/retry", tr.admin},
		{http.MethodGet, "/api/queue", "evil.example"},
	} {
		code, _, h := adminReq(t, tr, tc.method, tc.path, tc.host, nil)
		if h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s %s (%d): X-Content-Type-Options = %q", tc.method, tc.path, code, h.Get("X-Content-Type-Options"))
		}
		csp := h.Get("Content-Security-Policy")
		for _, d := range []string{"default-src 'none'", "style-src 'unsafe-inline'", "frame-ancestors 'none'"} {
			if !strings.Contains(csp, d) {
				t.Errorf("%s %s (%d): Content-Security-Policy %q lacks %q", tc.method, tc.path, code, csp, d)
			}
		}
	}
}

func TestAdminHosts_Rule(t *testing.T) {
	h := newAdminHosts("relaycar.local:9025", []string{"relaycar.mail.svc", "Ops.Example.com:8443", "[fd00::9]"})
	for host, want := range map[string]bool{
		"":                         true, // HTTP/1.0 probe; browsers always send Host
		"localhost":                true,
		"localhost:1":              true,
		"relaycar.local:9025":      true, // admin.address
		"relaycar.local:80":        true,
		"relaycar.mail.svc":        true, // allowed_hosts
		"RELAYCAR.MAIL.SVC.:9025":  true,
		"ops.example.com":          true, // an entry's port does not narrow it
		"127.0.0.1:9025":           true, // IP literals cannot rebind
		"127.9.9.9":                true,
		"[::1]:9025":               true,
		"[::1]":                    true,
		"::1":                      true,
		"10.244.1.7:9025":          true,
		"[fe80::1%25eth0]:9025":    true,
		"evil.example":             false,
		"evil.example:9025":        false,
		"relaycar.mail.svc.evil.x": false,
		"xlocalhost":               false,
		"127.1":                    false, // not a literal a browser would send
		"2130706433":               false,
		"localhost.":               true,
	} {
		if got := h.allowed(host); got != want {
			t.Errorf("allowed(%q) = %v, want %v", host, got, want)
		}
	}
	for _, tc := range []struct {
		origin, host string
		want         bool
	}{
		{"http://127.0.0.1:9025", "127.0.0.1:9025", true},
		{"http://LOCALHOST:9025", "localhost:9025", true},
		{"http://localhost:9025", "127.0.0.1:9025", true},
		{"https://relaycar.mail.svc", "10.0.0.1:9025", true},
		{"http://10.0.0.1:9025", "10.0.0.1:9025", true},
		{"http://10.0.0.2:9025", "10.0.0.1:9025", false}, // another IP's page
		{"http://127.0.0.1:3000", "127.0.0.1:9025", false},
		{"http://evil.example", "127.0.0.1:9025", false},
		{"null", "127.0.0.1:9025", false},
		{"file://", "127.0.0.1:9025", false},
		{"chrome-extension://abc", "127.0.0.1:9025", false},
	} {
		if got := h.sameSite(tc.origin, tc.host); got != tc.want {
			t.Errorf("sameSite(%q, Host %q) = %v, want %v", tc.origin, tc.host, got, tc.want)
		}
	}
}
