package upstreams

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
)

const (
	testMailbox      = "relay@contoso.example"
	testClientID     = "00000000-aaaa-bbbb-cccc-000000000001"
	testClientSecret = "cs~Very.Secret-Value_0123456789"
	testRefresh      = "1//0refresh-token-SECRET-abcdefghijklmnop"
)

// newOAuthSMTP builds an smtp upstream with auth and an oauth2 block
// through ApplyDefaults, Validate and New, as the relay does.
func newOAuthSMTP(t *testing.T, addr string, auth AuthMode, o OAuth2, d Deps) *smtpUpstream {
	t.Helper()
	c := Config{Name: "m365", Type: "smtp", Address: addr, TLS: TLSNone, Username: testMailbox, Auth: auth, OAuth2: o, Timeout: 5 * time.Second}
	c.ApplyDefaults()
	if errs := c.Validate("upstreams[0]"); len(errs) > 0 {
		t.Fatal(errs)
	}
	d.Hostname = "relay.test"
	u, err := New(c, d)
	if err != nil {
		t.Fatal(err)
	}
	return u.(*smtpUpstream)
}

// dropIdle closes the pooled connections, so the next send dials and
// authenticates again.
func dropIdle(s *smtpUpstream) {
	s.mu.Lock()
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	for _, sc := range idle {
		sc.close()
	}
}

func clientCredentials(ts *fakes.TokenServer) OAuth2 {
	return OAuth2{TokenURL: ts.URL, ClientID: testClientID, ClientSecret: testClientSecret}
}

func bearerSink(t *testing.T, ts *fakes.TokenServer) *testsmtp.Server {
	return testsmtp.Start(t, testsmtp.Options{Bearer: func(user, tok string) bool {
		return user == testMailbox && ts.Valid(tok)
	}})
}

func oauthMsg(i int) *Message {
	return &Message{ID: "m" + string(rune('a'+i)), From: testMailbox, To: []string{"b@example.net"},
		Body: BytesBody([]byte("Subject: hi\r\n\r\nbody\r\n")), MessageID: "<x@y>"}
}

// One token serves many messages and many connections at once; the token
// (about 2 KB, as Entra ID's) goes after the server's 334 prompt, not on
// the AUTH line, which Gmail and Dovecot would refuse as too long.
func TestSMTP_XOAUTH2SharesOneTokenAcrossDeliveries(t *testing.T) {
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret, Scope: scopeExchangeSMTP})
	sink := bearerSink(t, ts)
	u := newOAuthSMTP(t, sink.Addr, "", clientCredentials(ts), Deps{})
	if u.auth != AuthXOAuth2 {
		t.Fatalf("auth defaulted to %q with an oauth2 block, want xoauth2", u.auth)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			if _, err := u.Send(context.Background(), oauthMsg(i)); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i := range 4 {
		if _, err := u.Send(context.Background(), oauthMsg(i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := sink.Count(); n != 12 {
		t.Fatalf("sink has %d messages, want 12", n)
	}
	if n := ts.Requests(); n != 1 {
		t.Errorf("%d token requests for 12 messages, want 1", n)
	}
	resps := sink.AuthResponses()
	if len(resps) < 2 {
		t.Fatalf("only %d AUTH exchanges for 8 concurrent sends", len(resps))
	}
	for _, r := range resps {
		if r.OnAuthLine {
			t.Errorf("a %d-byte initial response was sent on the AUTH line", r.Len)
		}
		if r.Len < 1500 {
			t.Errorf("initial response of %d bytes: the fake's tokens are ~2 KB", r.Len)
		}
	}
}

// A token is replaced before it expires, without a refused AUTH first.
func TestSMTP_TokenRefreshedBeforeExpiry(t *testing.T) {
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret, ExpiresIn: 3600})
	sink := bearerSink(t, ts)
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	u := newOAuthSMTP(t, sink.Addr, AuthXOAuth2, clientCredentials(ts), Deps{Now: clock})
	send := func() {
		t.Helper()
		dropIdle(u)
		if _, err := u.Send(context.Background(), oauthMsg(0)); err != nil {
			t.Fatal(err)
		}
	}
	send()
	mu.Lock()
	now = now.Add(58 * time.Minute) // still two minutes to go: reused
	mu.Unlock()
	send()
	if n := ts.Requests(); n != 1 {
		t.Fatalf("%d token requests before the token's last minute, want 1", n)
	}
	mu.Lock()
	now = now.Add(90 * time.Second) // in its last minute: replaced
	mu.Unlock()
	send()
	if n := ts.Requests(); n != 2 {
		t.Fatalf("%d token requests after the token's last minute began, want 2", n)
	}
	if sink.Count() != 3 {
		t.Fatalf("sink has %d messages", sink.Count())
	}
}

// A 535 to a cached token (revoked at the provider) fetches a new one and
// authenticates again in the same attempt: the message goes out.
func TestSMTP_RefusedTokenRefreshedAndRetried(t *testing.T) {
	for _, auth := range []AuthMode{AuthXOAuth2, AuthOAuthBearer} {
		t.Run(string(auth), func(t *testing.T) {
			ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret})
			sink := bearerSink(t, ts)
			u := newOAuthSMTP(t, sink.Addr, auth, clientCredentials(ts), Deps{})
			if _, err := u.Send(context.Background(), oauthMsg(0)); err != nil {
				t.Fatal(err)
			}
			ts.RevokeAll()
			dropIdle(u)
			if _, err := u.Send(context.Background(), oauthMsg(1)); err != nil {
				t.Fatalf("after a revoked token: %v", err)
			}
			if n := ts.Requests(); n != 2 {
				t.Errorf("%d token requests, want 2 (the first, then one after the refusal)", n)
			}
			if sink.Count() != 2 {
				t.Errorf("sink has %d messages, want 2", sink.Count())
			}
		})
	}
}

// A token refused when it was fetched for this very attempt, or refused
// again after the retry with a fresh one, is the upstream's fault
// (permissions, service principal): provider_fault, so the route fails
// over and the breaker opens. A fresh token is not retried: the next one
// would be refused too.
func TestSMTP_FreshTokenRefusedIsProviderFault(t *testing.T) {
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret})
	var refuse atomic.Bool
	refuse.Store(true)
	sink := testsmtp.Start(t, testsmtp.Options{Bearer: func(_, tok string) bool { return !refuse.Load() && ts.Valid(tok) }})
	log, logs := fakes.NewLogger()
	u := newOAuthSMTP(t, sink.Addr, AuthXOAuth2, clientCredentials(ts), Deps{Logger: log})
	_, err := u.Send(context.Background(), oauthMsg(0))
	if ClassOf(err) != ProviderFault {
		t.Fatalf("class %v (%v), want provider_fault", ClassOf(err), err)
	}
	if !strings.Contains(err.Error(), "refused a freshly fetched token") || !strings.Contains(err.Error(), "535") {
		t.Errorf("reason %q does not say the fresh token was refused", err)
	}
	if n := ts.Requests(); n != 1 {
		t.Errorf("%d token requests for a refused fresh token, want 1", n)
	}
	// A cached token refused, then its fresh successor too: two requests.
	refuse.Store(false)
	dropIdle(u)
	if _, err := u.Send(context.Background(), oauthMsg(1)); err != nil {
		t.Fatal(err)
	}
	refuse.Store(true)
	dropIdle(u)
	_, err = u.Send(context.Background(), oauthMsg(2))
	if ClassOf(err) != ProviderFault || !strings.Contains(err.Error(), "refused a freshly fetched token") {
		t.Fatalf("%v, want provider_fault after the retry", err)
	}
	if n := ts.Requests(); n != 3 {
		t.Errorf("%d token requests, want 3 (refused fresh; good; refused cached then fresh)", n)
	}
	fakes.AssertNoSecret(t, err, logs, append(ts.Issued(), testClientSecret)...)
}

// Exchange Online's answer to a password once basic auth is off names the
// fix.
func TestSMTP_BasicAuthDisabledIsProviderFaultWithHint(t *testing.T) {
	for _, r := range []struct {
		code     int
		enh, msg string
	}{
		{535, "5.7.139", "Authentication unsuccessful, basic authentication is disabled"},
		{550, "5.7.30", "Basic authentication is not supported for Client Submission"},
	} {
		sink := testsmtp.Start(t, testsmtp.Options{PlainReply: testsmtp.Reply(r.code, r.enh, r.msg)})
		u := newTestSMTP(t, Config{Address: sink.Addr, Username: testMailbox, Password: "hunter2-password"})
		_, err := u.Send(context.Background(), oauthMsg(0))
		if ClassOf(err) != ProviderFault {
			t.Fatalf("%s: class %v, want provider_fault", r.enh, ClassOf(err))
		}
		if !strings.Contains(err.Error(), "auth: xoauth2") || !strings.Contains(err.Error(), r.enh) {
			t.Errorf("%s: reason %q lacks the code or the auth: xoauth2 hint", r.enh, err)
		}
	}
}

// Google service account with domain-wide delegation: an RS256 JWT
// assertion whose signature, sub (the mailbox), scope, aud and exp the
// token endpoint checks.
func TestSMTP_ServiceAccountJWTGrant(t *testing.T) {
	key, pub := fakes.ServiceAccountKey(t, "relay@proj.iam.gserviceaccount.com", "https://oauth2.googleapis.com/token")
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ServiceAccount: pub, SAEmail: "relay@proj.iam.gserviceaccount.com", Subject: testMailbox, Scope: scopeGmail})
	sink := bearerSink(t, ts)
	u := newOAuthSMTP(t, sink.Addr, AuthXOAuth2, OAuth2{ServiceAccountFile: "sa.json", ServiceAccountKey: Secret(key), TokenURL: ts.URL}, Deps{})
	if _, err := u.Send(context.Background(), oauthMsg(0)); err != nil {
		t.Fatalf("%v (token endpoint refusals: %q)", err, ts.Refusals())
	}
	if g := ts.Grants(); len(g) != 1 || g[0] != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
		t.Errorf("grants %q", g)
	}
	if sink.Count() != 1 {
		t.Errorf("sink has %d messages", sink.Count())
	}
}

// x/oauth2's jwt grant says "cannot fetch token" for a body it cannot
// parse too: a 200 with an HTML page (a captive proxy, a wrong token_url)
// is the setup's fault, not a response that broke off.
func TestSMTP_ServiceAccountJWTGrantHTMLAnswer(t *testing.T) {
	key, pub := fakes.ServiceAccountKey(t, "relay@proj.iam.gserviceaccount.com", "https://oauth2.googleapis.com/token")
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ServiceAccount: pub, SAEmail: "relay@proj.iam.gserviceaccount.com", Subject: testMailbox, Scope: scopeGmail})
	page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<html><body>Sign in to the proxy</body></html>")
	}))
	defer page.Close()
	sink := bearerSink(t, ts) // offers AUTH XOAUTH2; the token never comes
	u := newOAuthSMTP(t, sink.Addr, AuthXOAuth2, OAuth2{ServiceAccountFile: "sa.json", ServiceAccountKey: Secret(key), TokenURL: page.URL}, Deps{})
	_, err := u.Send(context.Background(), oauthMsg(0))
	if ClassOf(err) != ProviderFault || strings.Contains(err.Error(), "broke off") {
		t.Errorf("class %v (%v), want provider_fault", ClassOf(err), err)
	}
}

// The refresh-token grant, against Google's defaults for scope.
func TestSMTP_RefreshTokenGrant(t *testing.T) {
	ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret, RefreshToken: testRefresh, Scope: scopeGmail})
	sink := bearerSink(t, ts)
	// Google's refresh grant takes the OAuth client's secret too.
	u := newOAuthSMTP(t, sink.Addr, AuthOAuthBearer, OAuth2{RefreshTokenFile: "rt", RefreshToken: testRefresh, ClientID: testClientID,
		ClientSecretFile: "cs", ClientSecret: testClientSecret, TokenURL: ts.URL}, Deps{})
	if _, err := u.Send(context.Background(), oauthMsg(0)); err != nil {
		t.Fatalf("%v (refusals %q)", err, ts.Refusals())
	}
	if g := ts.Grants(); len(g) != 1 || g[0] != "refresh_token" {
		t.Errorf("grants %q", g)
	}
}

// Token endpoint failures: a refusal of the credentials is provider_fault
// with the RFC 6749 code in the reason; an endpoint that cannot be
// reached or answers 5xx is transient. Never the secret or a token.
func TestSMTP_TokenEndpointErrors(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadURL := "http://" + dead.Addr().String() + "/token"
	dead.Close()
	// A 200 whose body ends long before its Content-Length.
	cut := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"access_token\":\"eyJ0")
		buf.Flush()
		c.Close()
	}))
	defer cut.Close()
	for _, tc := range []struct {
		name      string
		fail      func(int) (int, string, string)
		url       string
		class     Class
		inReason  string
		secretBad bool
	}{
		{name: "invalid_client", fail: func(int) (int, string, string) {
			return 401, "invalid_client", "AADSTS7000215: Invalid client secret provided. " + testClientSecret
		}, class: ProviderFault, inReason: "invalid_client"},
		{name: "invalid_scope", fail: func(int) (int, string, string) { return 400, "invalid_scope", "AADSTS70011" }, class: ProviderFault, inReason: "invalid_scope"},
		{name: "temporarily_unavailable", fail: func(int) (int, string, string) { return 503, "temporarily_unavailable", "try later" }, class: Transient, inReason: "503"},
		{name: "temporarily_unavailable with 400", fail: func(int) (int, string, string) { return 400, "temporarily_unavailable", "AADSTS50196" }, class: Transient, inReason: "temporarily_unavailable"},
		{name: "unreachable", url: deadURL, class: Transient, inReason: "unreachable"},
		{name: "response cut off", url: cut.URL + "/token", class: Transient, inReason: "broke off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret, Fail: tc.fail})
			o := clientCredentials(ts)
			if tc.url != "" {
				o.TokenURL = tc.url
			}
			sink := bearerSink(t, ts)
			log, logs := fakes.NewLogger()
			u := newOAuthSMTP(t, sink.Addr, AuthXOAuth2, o, Deps{Logger: log})
			_, err := u.Send(context.Background(), oauthMsg(0))
			if ClassOf(err) != tc.class {
				t.Fatalf("class %v (%v), want %v", ClassOf(err), err, tc.class)
			}
			if !strings.Contains(err.Error(), tc.inReason) {
				t.Errorf("reason %q lacks %q", err, tc.inReason)
			}
			fakes.AssertNoSecret(t, err, logs, testClientSecret)
			if sink.Count() != 0 {
				t.Error("a message went out without a token")
			}
		})
	}
}

func TestOAuth2_ConfigChecks(t *testing.T) {
	dir := t.TempDir()
	sa := filepath.Join(dir, "sa.json")
	key, _ := fakes.ServiceAccountKey(t, "x@p.iam.gserviceaccount.com", "")
	if err := os.WriteFile(sa, key, 0o600); err != nil {
		t.Fatal(err)
	}
	notSA := filepath.Join(dir, "user.json")
	if err := os.WriteFile(notSA, []byte(`{"type":"authorized_user","client_id":"x"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	base := func(o OAuth2, auth AuthMode) Config {
		return Config{Name: "m", Type: "smtp", Address: "smtp.office365.com:587", Username: testMailbox, Auth: auth, OAuth2: o}
	}
	for _, tc := range []struct {
		name string
		c    Config
		want string // "" = valid
	}{
		{"client credentials", base(OAuth2{TokenURL: "https://login.microsoftonline.com/t/oauth2/v2.0/token", ClientID: "id", ClientSecret: "s"}, ""), ""},
		{"service account", base(OAuth2{ServiceAccountFile: sa}, AuthXOAuth2), ""},
		{"refresh token", base(OAuth2{RefreshTokenFile: sa, ClientID: "id"}, AuthOAuthBearer), ""},
		{"refresh token with client secret", base(OAuth2{RefreshTokenFile: sa, ClientID: "id", ClientSecret: "s"}, AuthXOAuth2), ""},
		{"no grant", base(OAuth2{ClientID: "id"}, AuthXOAuth2), "upstreams[0].oauth2: set one grant"},
		{"two grants", base(OAuth2{ClientSecret: "s", ServiceAccountFile: sa}, AuthXOAuth2), "upstreams[0].oauth2: set only one of"},
		{"no token_url", base(OAuth2{ClientID: "id", ClientSecret: "s"}, ""), "upstreams[0].oauth2.token_url: required"},
		{"bad token_url", base(OAuth2{TokenURL: "login.example/token", ClientID: "id", ClientSecret: "s"}, ""), "upstreams[0].oauth2.token_url: must be an absolute"},
		{"xoauth2 without block", base(OAuth2{}, AuthXOAuth2), "upstreams[0].oauth2: required with auth: xoauth2"},
		{"plain with block", base(OAuth2{TokenURL: "https://x/t", ClientID: "id", ClientSecret: "s"}, AuthPlain), "upstreams[0].auth: plain sends a password"},
		{"not a service account", base(OAuth2{ServiceAccountFile: notSA}, AuthXOAuth2), `upstreams[0].oauth2.service_account_file: type is "authorized_user"`},
		{"unknown auth", base(OAuth2{}, "cram-md5"), `upstreams[0].auth: "cram-md5": must be`},
		{"oauth2 on ses", Config{Name: "s", Type: "ses", Region: "us-east-1", OAuth2: OAuth2{ClientID: "x"}}, "upstreams[0].oauth2: not used by type ses"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.c
			if errs := c.ResolveSecrets("upstreams[0]"); len(errs) > 0 && tc.want == "" {
				t.Fatal(errs)
			}
			c.ApplyDefaults()
			errs := c.Validate("upstreams[0]")
			var got []string
			for _, e := range errs {
				got = append(got, e.Error())
			}
			all := strings.Join(got, "\n")
			switch {
			case tc.want == "" && len(errs) > 0:
				t.Errorf("unexpected problems:\n%s", all)
			case tc.want != "" && !strings.Contains(all, tc.want):
				t.Errorf("problems:\n%s\nwant one containing %q", all, tc.want)
			}
		})
	}
}
