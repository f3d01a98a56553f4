package upstreams

import (
	"bufio"
	"context"
	"encoding/base64"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

// rawSMTP is an SMTP server that answers AUTH with reply(the client's
// response as sent, and decoded with NULs as spaces). It serves at most
// 20 connections and stops when the listener closes.
func rawSMTP(t *testing.T, mech string, reply func(raw, cred string) string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for i := 0; i < 20; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				r := bufio.NewReader(c)
				w := func(s string) { c.Write([]byte(s + "\r\n")) }
				w("220 fake ESMTP")
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					line = strings.TrimRight(line, "\r\n")
					up := strings.ToUpper(line)
					switch {
					case strings.HasPrefix(up, "EHLO"):
						w("250-fake")
						w("250 AUTH " + mech)
					case strings.HasPrefix(up, "AUTH"):
						f := strings.Fields(line)
						var resp string
						if len(f) >= 3 {
							resp = f[2]
						} else {
							w("334 ")
							resp, _ = r.ReadString('\n')
							resp = strings.TrimRight(resp, "\r\n")
						}
						if mech == "LOGIN" { // that was the user name
							w("334 UGFzc3dvcmQ6")
							resp, _ = r.ReadString('\n')
							resp = strings.TrimRight(resp, "\r\n")
						}
						dec, _ := base64.StdEncoding.DecodeString(resp)
						w(reply(resp, strings.ReplaceAll(string(dec), "\x00", " ")))
					case strings.HasPrefix(up, "QUIT"):
						w("221 bye")
						return
					default:
						w("250 ok")
					}
				}
			}(c)
		}
	}()
	return ln.Addr().String()
}

// A smarthost whose 535 quotes the credentials it got, decoded or as
// sent: the reason goes to logs, the spool's last error, dead letters,
// the admin API and relaycar queue, so the secret must not.
func TestSMTP_ReplyQuotingThePasswordIsRedacted(t *testing.T) {
	t.Parallel()
	const pw = "Sup3r-Secret-Password-42"
	for name, echo := range map[string]func(raw, cred string) string{
		"decoded": func(_, cred string) string { return cred },
		"as sent": func(raw, _ string) string { return raw },
		"alone":   func(_, cred string) string { return cred[strings.LastIndex(cred, " ")+1:] },
	} {
		addr := rawSMTP(t, "PLAIN", func(raw, cred string) string {
			return "535 5.7.8 Authentication failed for [" + echo(raw, cred) + "]"
		})
		err := sendWithPassword(t, addr, "", pw)
		if ClassOf(err) != ProviderFault {
			t.Errorf("%s: %v, want provider_fault", name, err)
		}
		b64 := base64.StdEncoding.EncodeToString([]byte("\x00me@example.com\x00" + pw))
		if s := err.Error(); strings.Contains(s, pw) || strings.Contains(s, b64) || !strings.Contains(s, "<secret>") {
			t.Errorf("%s: %v, want the password replaced by <secret>", name, err)
		}
	}
}

// issuing is a token endpoint that hands out access.
func issuing(t *testing.T, access string) *httptest.Server {
	tok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"access_token":"` + access + `","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(tok.Close)
	return tok
}

// sendWithPassword sends one message through an smtp upstream at addr
// that logs in as me@example.com with pw (auth "" picks the mechanism).
func sendWithPassword(t *testing.T, addr string, auth AuthMode, pw string) error {
	t.Helper()
	c := Config{Name: "sh", Type: "smtp", Address: addr, TLS: TLSNone, Username: "me@example.com", Password: Secret(pw), Auth: auth, Timeout: 5 * time.Second}
	c.ApplyDefaults()
	if errs := c.Validate("upstreams[0]"); len(errs) > 0 {
		t.Fatal(errs)
	}
	u, err := New(c, Deps{Hostname: "relay.test"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.Send(context.Background(), oauthMsg(0))
	return err
}

// The same with XOAUTH2: the access token was fetched, not configured,
// and is still kept out of the reason.
func TestSMTP_ReplyQuotingTheAccessTokenIsRedacted(t *testing.T) {
	t.Parallel()
	const access = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
	tok := issuing(t, access)
	for name, echo := range map[string]func(raw, cred string) string{
		"decoded": func(_, cred string) string { return strings.ReplaceAll(cred, "\x01", " ") },
		"as sent": func(raw, _ string) string { return raw },
		"alone":   func(string, string) string { return "token " + access + " expired" },
	} {
		addr := rawSMTP(t, "XOAUTH2", func(raw, cred string) string {
			return "535 5.7.8 invalid credentials: " + echo(raw, cred)
		})
		u := newOAuthSMTP(t, addr, AuthXOAuth2, OAuth2{TokenURL: tok.URL, ClientID: testClientID, ClientSecret: testClientSecret}, Deps{})
		_, err := u.Send(context.Background(), oauthMsg(0))
		if err == nil {
			t.Fatalf("%s: delivered, want a refusal", name)
		}
		if s := err.Error(); strings.Contains(s, "c2lnbmF0dXJlLXNpZ25hdHVyZQ") || strings.Contains(s, access[:40]) || !strings.Contains(s, "<secret>") {
			t.Errorf("%s: %v, want the token replaced by <secret>", name, err)
		}
	}
}

// The token endpoint's error_description is cut to 200 bytes after the
// configured secrets are replaced: cut first, a secret across the cut
// would leave its first part in the reason.
func TestOAuth2_DescriptionRedactedBeforeItIsCut(t *testing.T) {
	t.Parallel()
	pad := strings.Repeat("x", 170)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(401)
		w.Write([]byte(`{"error":"invalid_client","error_description":"AADSTS7000215: ` + pad + ` got ` + testClientSecret + ` end"}`))
	}))
	defer srv.Close()
	ts, err := newTokenSource("m365", OAuth2{TokenURL: srv.URL, ClientID: testClientID, ClientSecret: testClientSecret}, "", []string{"s"}, srv.Client(), time.Now)
	if err != nil {
		t.Fatal(err)
	}
	_, err = ts.Token(context.Background())
	if err == nil || strings.Contains(err.Error(), testClientSecret[:10]) {
		t.Errorf("part of the client secret survives in the reason: %v", err)
	}
}

// Graph's error.message is redacted before it is cut, too.
func TestGraph_MessageRedactedBeforeItIsCut(t *testing.T) {
	t.Parallel()
	const access = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20iLCJyb2xlcyI6WyJNYWlsLlNlbmQiXX0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNpZ25hdHVyZQ"
	tok := issuing(t, access)
	graph := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		w.Write([]byte(`{"error":{"code":"InvalidAuthenticationToken","message":"` + strings.Repeat("y", 60) + ` token '` + got + `' rejected"}}`))
	}))
	defer graph.Close()
	c := Config{Name: "graph", Type: "msgraph", TenantID: "contoso.example", ClientID: testClientID, ClientSecret: testClientSecret,
		Endpoint: graph.URL, TokenURL: tok.URL, Sender: testMailbox, Timeout: 5 * time.Second}
	c.ApplyDefaults()
	if errs := c.Validate("upstreams[0]"); len(errs) > 0 {
		t.Fatal(errs)
	}
	u, err := New(c, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.Send(context.Background(), oauthMsg(0))
	if err == nil || strings.Contains(err.Error(), access[:20]) {
		t.Errorf("the first 100+ chars of the access token survive: %v", err)
	}
}

// With sender empty the mailbox is the envelope sender; an application
// access policy that leaves this one mailbox out answers 403
// ErrorAccessDenied, which is this sender's problem, not the upstream's.
func TestGraph_AccessPolicyDenialIsPerSender(t *testing.T) {
	t.Parallel()
	ts := graphTokens(t)
	api := graphFake(t, ts, func(int, fakes.Request) *fakes.Reply {
		r := fakes.JSON(403, `{"error":{"code":"ErrorAccessDenied","message":"Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings."}}`)
		return &r
	})
	u := newTestGraph(t, api, ts, "", Deps{})
	_, err := u.Send(context.Background(), graphMsg)
	if ClassOf(err) != SenderRejected || !strings.Contains(err.Error(), "application access policy") {
		t.Errorf("class %v (%v), want sender_rejected naming the access policy", ClassOf(err), err)
	}
	// Without the permission at all it is every mailbox: the upstream's.
	api = graphFake(t, ts, func(int, fakes.Request) *fakes.Reply {
		r := fakes.JSON(403, `{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}`)
		return &r
	})
	u = newTestGraph(t, api, ts, "", Deps{})
	if _, err = u.Send(context.Background(), graphMsg); ClassOf(err) != ProviderFault {
		t.Errorf("403 without the policy text: %v (%v), want provider_fault", ClassOf(err), err)
	}
}

// A throttled token endpoint (429 with Retry-After) pauses the upstream
// until then, as the provider's own throttling does, instead of counting
// against its breaker.
func TestOAuth2_ThrottledTokenEndpointPauses(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
		w.Write([]byte(`{"error":"temporarily_unavailable","error_description":"AADSTS50196: throttled"}`))
	}))
	defer srv.Close()
	now := time.Now()
	ts, err := newTokenSource("m365", OAuth2{TokenURL: srv.URL, ClientID: testClientID, ClientSecret: testClientSecret}, "", []string{"s"}, srv.Client(), func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	_, err = ts.Token(context.Background())
	if ClassOf(err) != Transient || !RetryAtOf(err).Equal(now.Add(7*time.Second)) {
		t.Errorf("%v (retry at %v), want transient with a pause until now+7s", err, RetryAtOf(err))
	}
}
