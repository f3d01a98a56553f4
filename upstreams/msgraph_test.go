package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

// graphFake answers sendMail the way Microsoft documents it: 202 Accepted
// without a body when the bearer token is one the token fake issued, 401
// InvalidAuthenticationToken otherwise, and what reply says for the rest.
func graphFake(t *testing.T, ts *fakes.TokenServer, reply func(n int, r fakes.Request) *fakes.Reply) *fakes.HTTP {
	return fakes.NewHTTP(t, func(n int, r fakes.Request) fakes.Reply {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !ts.Valid(tok) {
			return fakes.JSON(401, `{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}`)
		}
		if reply != nil {
			if rep := reply(n, r); rep != nil {
				return *rep
			}
		}
		return fakes.Reply{Status: 202, Header: map[string]string{"request-id": "4f2e-req-" + string(rune('a'+n%26))}}
	})
}

func newTestGraph(t *testing.T, api *fakes.HTTP, ts *fakes.TokenServer, sender string, d Deps) *msgraphUpstream {
	t.Helper()
	c := Config{Name: "graph", Type: "msgraph", TenantID: "contoso.onmicrosoft.com", ClientID: testClientID,
		ClientSecret: testClientSecret, Endpoint: api.URL, TokenURL: ts.URL, Sender: sender, Timeout: 5 * time.Second}
	c.ApplyDefaults()
	if errs := c.Validate("upstreams[0]"); len(errs) > 0 {
		t.Fatal(errs)
	}
	u, err := New(c, d)
	if err != nil {
		t.Fatal(err)
	}
	return u.(*msgraphUpstream)
}

func graphTokens(t *testing.T) *fakes.TokenServer {
	return fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: testClientID, ClientSecret: testClientSecret, Scope: scopeGraph})
}

var graphMsg = &Message{ID: "g1", From: testMailbox,
	To:        []string{"to@example.net", "cc@example.org", "hidden@example.com"},
	AllRcpts:  []string{"to@example.net", "cc@example.org", "hidden@example.com"},
	Body:      BytesBody([]byte("From: App <" + testMailbox + ">\r\nTo: to@example.net\r\nCc: cc@example.org\r\nSubject: report\r\nMessage-Id: <g1@x>\r\n\r\nbody\r\n")),
	MessageID: "<g1@x>"}

// The request: the mailbox in the path, text/plain, the base64 of the
// message with a Bcc header for the envelope-only recipient; To and Cc as
// they were. One token serves every message.
func TestMSGraph_SendsMIMEWithEnvelopeOnlyRecipientsInBcc(t *testing.T) {
	ts := graphTokens(t)
	api := graphFake(t, ts, nil)
	u := newTestGraph(t, api, ts, "", Deps{})
	for range 3 {
		rc, err := u.Send(context.Background(), graphMsg)
		id := rc.ProviderID
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(id, "4f2e-req-") {
			t.Errorf("provider id %q, want the request-id header", id)
		}
	}
	if n := ts.Requests(); n != 1 {
		t.Errorf("%d token requests for 3 messages, want 1", n)
	}
	reqs := api.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests", len(reqs))
	}
	r := reqs[0]
	if r.Method != "POST" || r.Path != "/v1.0/users/"+testMailbox+"/sendMail" {
		t.Errorf("%s %s", r.Method, r.Path)
	}
	if ct := r.Header.Get("Content-Type"); ct != "text/plain" {
		t.Errorf("Content-Type %q", ct)
	}
	raw, err := base64.StdEncoding.DecodeString(string(r.Body))
	if err != nil {
		t.Fatalf("body is not base64: %v", err)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if got := msg.Header.Get("Bcc"); got != "hidden@example.com" {
		t.Errorf("Bcc %q, want the envelope-only recipient", got)
	}
	if msg.Header.Get("To") != "to@example.net" || msg.Header.Get("Cc") != "cc@example.org" {
		t.Errorf("To %q Cc %q changed", msg.Header.Get("To"), msg.Header.Get("Cc"))
	}
	if !bytes.HasSuffix(raw, []byte("\r\n\r\nbody\r\n")) {
		t.Errorf("body changed: %q", raw)
	}
}

// A 401 to a cached token is answered with one fresh token.
func TestMSGraph_ExpiredTokenRefreshedOnce(t *testing.T) {
	ts := graphTokens(t)
	api := graphFake(t, ts, nil)
	u := newTestGraph(t, api, ts, testMailbox, Deps{})
	if _, err := u.Send(context.Background(), graphMsg); err != nil {
		t.Fatal(err)
	}
	ts.RevokeAll()
	if _, err := u.Send(context.Background(), graphMsg); err != nil {
		t.Fatalf("after revocation: %v", err)
	}
	if n := ts.Requests(); n != 2 {
		t.Errorf("%d token requests, want 2", n)
	}
	if n := len(api.Requests()); n != 3 {
		t.Errorf("%d sendMail requests, want 3 (ok, 401, ok)", n)
	}
}

// Graph's answers and what the relay does with them.
func TestMSGraph_ErrorClasses(t *testing.T) {
	graphErr := func(status int, code, msg string, hdr map[string]string) *fakes.Reply {
		r := fakes.JSON(status, `{"error":{"code":"`+code+`","message":"`+msg+`","innerError":{"request-id":"r1","date":"2026-12-01T12:00:00"}}}`)
		for k, v := range hdr {
			r.Header[k] = v
		}
		return &r
	}
	for _, tc := range []struct {
		name   string
		sender string
		reply  *fakes.Reply
		class  Class
		reason string
	}{
		{"bad base64", "", graphErr(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.", nil), Rejected, "ErrorMimeContentInvalidBase64String"},
		{"send as denied, envelope sender", "", graphErr(403, "ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.", nil), SenderRejected, "mailbox " + testMailbox},
		{"send as denied, fixed sender", testMailbox, graphErr(403, "ErrorSendAsDenied", "not allowed", nil), ProviderFault, "ErrorSendAsDenied"},
		{"no permission", testMailbox, graphErr(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.", nil), ProviderFault, "Mail.Send"},
		{"unknown mailbox", "", graphErr(404, "ErrorInvalidUser", "The requested user is invalid.", nil), SenderRejected, "ErrorInvalidUser"},
		{"too large", "", graphErr(413, "RequestEntityTooLarge", "The request size exceeds the maximum limit.", nil), Unsupported, "413"},
		{"throttled", "", graphErr(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.", map[string]string{"Retry-After": "7"}), Transient, "Retry-After 7"},
		{"unavailable", "", graphErr(503, "ServiceUnavailable", "busy", map[string]string{"Retry-After": "3"}), Transient, "503"},
		{"down", "", graphErr(503, "ServiceUnavailable", "down", nil), Transient, "503"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := graphTokens(t)
			api := graphFake(t, ts, func(int, fakes.Request) *fakes.Reply { return tc.reply })
			log, logs := fakes.NewLogger()
			u := newTestGraph(t, api, ts, tc.sender, Deps{Logger: log})
			_, err := u.Send(context.Background(), graphMsg)
			if ClassOf(err) != tc.class {
				t.Fatalf("class %v (%v), want %v", ClassOf(err), err, tc.class)
			}
			// A 429, or a 503 with Retry-After, pauses the upstream; a 503
			// without one counts against the breaker like any outage.
			if paused := !RetryAtOf(err).IsZero(); paused != (tc.reply.Status == 429 || tc.reply.Status == 503 && tc.reply.Header["Retry-After"] != "") {
				t.Errorf("RetryAt %v for HTTP %d", RetryAtOf(err), tc.reply.Status)
			}
			if tc.reply.Status == 429 {
				if d := time.Until(RetryAtOf(err)); d < 6*time.Second || d > 7*time.Second {
					t.Errorf("paused for %v, want Retry-After's 7s", d)
				}
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("reason %q lacks %q", err, tc.reason)
			}
			fakes.AssertNoSecret(t, err, logs, append(ts.Issued(), testClientSecret)...)
		})
	}
}

// A refused fresh token is the app registration's fault, and is not
// retried: the next fresh one would be refused too.
func TestMSGraph_TokenRefusedTwiceIsProviderFault(t *testing.T) {
	ts := graphTokens(t)
	api := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
		return fakes.JSON(401, `{"error":{"code":"InvalidAuthenticationToken","message":"Access token validation failure."}}`)
	})
	u := newTestGraph(t, api, ts, "", Deps{})
	_, err := u.Send(context.Background(), graphMsg)
	if ClassOf(err) != ProviderFault || !strings.Contains(err.Error(), "InvalidAuthenticationToken") {
		t.Fatalf("%v, want provider_fault naming InvalidAuthenticationToken", err)
	}
	if n := len(api.Requests()); n != 1 {
		t.Errorf("%d requests for a fresh token's refusal, want 1", n)
	}
}

// What Graph cannot do: send for the null sender, or leave out a header
// recipient that another route delivers to.
func TestMSGraph_Unsupported(t *testing.T) {
	ts := graphTokens(t)
	api := graphFake(t, ts, nil)
	u := newTestGraph(t, api, ts, "", Deps{})
	bounce := *graphMsg
	bounce.From = ""
	if _, err := u.Send(context.Background(), &bounce); ClassOf(err) != Unsupported {
		t.Errorf("null sender: %v, want unsupported", err)
	}
	split := *graphMsg
	split.To = []string{"to@example.net"}
	if _, err := u.Send(context.Background(), &split); ClassOf(err) != Unsupported || !strings.Contains(err.Error(), "cc@example.org") {
		t.Errorf("split delivery: %v, want unsupported naming cc@example.org", err)
	}
	if n := len(api.Requests()); n != 0 {
		t.Errorf("%d requests for messages Graph cannot carry", n)
	}
}

func TestMSGraph_ConfigChecks(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		want string
	}{
		{"ok", Config{Name: "g", Type: "msgraph", TenantID: "t", ClientID: "id", ClientSecret: "s"}, ""},
		{"no tenant", Config{Name: "g", Type: "msgraph", ClientID: "id", ClientSecret: "s"}, "upstreams[0].tenant_id: required"},
		{"no secret", Config{Name: "g", Type: "msgraph", TenantID: "t", ClientID: "id"}, "upstreams[0].client_secret: required"},
		{"bad sender", Config{Name: "g", Type: "msgraph", TenantID: "t", ClientID: "id", ClientSecret: "s", Sender: "relay"}, "upstreams[0].sender:"},
		{"address not used", Config{Name: "g", Type: "msgraph", TenantID: "t", ClientID: "id", ClientSecret: "s", Address: "x:25"}, "upstreams[0].address: not used by type msgraph"},
		{"tenant on smtp", Config{Name: "s", Type: "smtp", Address: "x:25", TenantID: "t"}, "upstreams[0].tenant_id: not used by type smtp"},
		{"too big", Config{Name: "g", Type: "msgraph", TenantID: "t", ClientID: "id", ClientSecret: "s", MaxMessageBytes: 10 << 20}, "above Microsoft Graph's limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.c
			c.ApplyDefaults()
			var got []string
			for _, e := range c.Validate("upstreams[0]") {
				got = append(got, e.Error())
			}
			all := strings.Join(got, "\n")
			if (tc.want == "") != (all == "") || !strings.Contains(all, tc.want) {
				t.Errorf("problems:\n%s\nwant %q", all, tc.want)
			}
		})
	}
}
