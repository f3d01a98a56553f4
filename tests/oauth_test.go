package tests

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
)

const (
	m365Mailbox  = "relay@contoso.example"
	m365ClientID = "11111111-2222-3333-4444-555555555555"
	m365Secret   = "Q~m365.client-secret_VALUE-0123456789"
)

// writeSecret writes a secret file the way a Kubernetes Secret volume
// holds one (with a trailing newline) and returns its path.
func writeSecret(t *testing.T, name, value string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(value+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Microsoft 365 both ways through the built binary: Graph sendMail first,
// SMTP with XOAUTH2 as its failover. Graph takes the first message (the
// base64 MIME with the envelope-only recipient in Bcc); then the app loses
// Mail.Send (403), which fails the second message over to SMTP, where the
// ~2 KB token authenticates after the 334 prompt. Each grant asks its
// token endpoint once. No secret or token reaches the log, the queue API
// or the metrics.
func TestOAuth_GraphWithXOAUTH2Failover(t *testing.T) {
	t.Parallel()
	graphTokens := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: m365ClientID, ClientSecret: m365Secret, Scope: "https://graph.microsoft.com/.default"})
	smtpTokens := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: m365ClientID, ClientSecret: m365Secret, Scope: "https://outlook.office365.com/.default"})
	var denied atomic.Bool
	graph := fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		switch {
		case r.Method != http.MethodPost || r.Path != "/v1.0/users/"+m365Mailbox+"/sendMail":
			return fakes.JSON(404, `{"error":{"code":"ResourceNotFound","message":"Resource not found"}}`)
		case !graphTokens.Valid(tok):
			return fakes.JSON(401, `{"error":{"code":"InvalidAuthenticationToken","message":"Access token is empty."}}`)
		case denied.Load():
			return fakes.JSON(403, `{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}`)
		}
		return fakes.Reply{Status: 202, Header: map[string]string{"request-id": "8a6f-graph-req"}}
	})
	sink := testsmtp.Start(t, testsmtp.Options{Bearer: func(user, tok string) bool {
		return user == m365Mailbox && smtpTokens.Valid(tok)
	}})
	secretFile := writeSecret(t, "client_secret", m365Secret)
	h := newHarness(t, fmt.Sprintf(`
upstreams:
  - name: graph
    type: msgraph
    tenant_id: contoso.onmicrosoft.com
    client_id: %s
    client_secret_file: %s
    sender: %s
    endpoint: %q
    token_url: %q
  - name: m365-smtp
    type: smtp
    address: %s
    tls: none
    username: %s
    auth: xoauth2
    oauth2:
      token_url: %q
      client_id: %s
      client_secret_file: %s
routes:
  - {name: default, upstreams: [graph, m365-smtp], strategy: failover}
`, m365ClientID, secretFile, m365Mailbox, graph.URL, graphTokens.URL, sink.Addr, m365Mailbox, smtpTokens.URL, m365ClientID, secretFile))

	data1 := "From: Scanner <" + m365Mailbox + ">\r\nTo: ops@example.net\r\nSubject: scan 1\r\n\r\nfirst\r\n"
	h.mustSend(m365Mailbox, []string{"ops@example.net", "audit@example.org"}, data1)
	h.waitSpoolEmpty(15 * time.Second)
	reqs := graph.Requests()
	if len(reqs) != 1 {
		t.Fatalf("graph fake got %d requests, want 1", len(reqs))
	}
	if ct := reqs[0].Header.Get("Content-Type"); ct != "text/plain" {
		t.Errorf("Content-Type %q, want text/plain", ct)
	}
	raw, err := base64.StdEncoding.DecodeString(string(reqs[0].Body))
	if err != nil {
		t.Fatalf("Graph body is not base64: %v", err)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if got := msg.Header.Get("Bcc"); got != "audit@example.org" {
		t.Errorf("Bcc %q, want the envelope-only recipient", got)
	}
	if msg.Header.Get("Subject") != "scan 1" || msg.Header.Get("Message-Id") == "" {
		t.Errorf("Graph copy lost its Subject or Message-ID:\n%s", raw)
	}

	denied.Store(true)
	data2 := "From: Scanner <" + m365Mailbox + ">\r\nTo: ops@example.net\r\nSubject: scan 2\r\n\r\nsecond\r\n"
	h.mustSend(m365Mailbox, []string{"ops@example.net"}, data2)
	h.waitSpoolEmpty(15 * time.Second)
	got := sink.Messages()
	if len(got) != 1 || !slices.Equal(got[0].To, []string{"ops@example.net"}) || !strings.Contains(string(got[0].Data), "Subject: scan 2") {
		t.Fatalf("smtp sink got %d messages (%+v), want the second one", len(got), got)
	}
	if got[0].User != m365Mailbox {
		t.Errorf("smtp session authenticated as %q", got[0].User)
	}
	for _, r := range sink.AuthResponses() {
		if r.OnAuthLine || r.Len < 1500 {
			t.Errorf("XOAUTH2 initial response of %d bytes, on the AUTH line: %v", r.Len, r.OnAuthLine)
		}
	}
	if n := graphTokens.Requests(); n != 1 {
		t.Errorf("graph token endpoint asked %d times, want 1", n)
	}
	if n := smtpTokens.Requests(); n != 1 {
		t.Errorf("smtp token endpoint asked %d times, want 1", n)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=graph", "result=provider_fault"); v != 1 {
		t.Errorf(`deliveries{graph,provider_fault} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=m365-smtp", "result=delivered"); v != 1 {
		t.Errorf(`deliveries{m365-smtp,delivered} = %v, want 1`, v)
	}
	secrets := append(append([]string{m365Secret}, graphTokens.Issued()...), smtpTokens.Issued()...)
	_, metrics := h.get("/metrics")
	_, queue := h.get("/api/queue")
	assertNoSecrets(t, h, secrets, map[string][]byte{"/metrics": metrics, "/api/queue": queue})
}

// A revoked client secret: the token endpoint's invalid_client is a
// provider fault with the OAuth error code in the reason; the message
// waits, expires at max_age and is dead-lettered with that reason — and
// neither the dead-letter file, the queue API, the log nor the metrics
// carry the secret.
func TestOAuth_RevokedSecretDeadLettersWithReasonNoSecret(t *testing.T) {
	t.Parallel()
	tokens := fakes.NewTokenServer(t, fakes.TokenOptions{ClientID: m365ClientID, ClientSecret: "the-secret-Entra-has-now", EchoSecret: true})
	sink := testsmtp.Start(t, testsmtp.Options{Bearer: func(string, string) bool { return true }})
	secretFile := writeSecret(t, "client_secret", m365Secret)
	h := newHarness(t, fmt.Sprintf(`
spool: {max_age: 3s}
upstreams:
  - name: m365-smtp
    type: smtp
    address: %s
    tls: none
    username: %s
    oauth2:
      token_url: %q
      client_id: %s
      client_secret_file: %s
routes:
  - {name: default, upstreams: [m365-smtp]}
`, sink.Addr, m365Mailbox, tokens.URL, m365ClientID, secretFile))
	id := h.mustSend(m365Mailbox, []string{"ops@example.net"}, "Subject: nightly\r\n\r\nbody\r\n")
	waitFor(t, 20*time.Second, "the message to be dead-lettered", func() bool { return len(h.deadIDs()) == 1 })
	env := deadEnvelope(t, h.spool, id)
	reason := ""
	for _, f := range env.Failures {
		reason += f.Reason + "\n"
	}
	if !strings.Contains(reason, "invalid_client") || !strings.Contains(reason, "AADSTS7000215") {
		t.Errorf("dead-letter reasons do not name the token endpoint's error:\n%s", reason)
	}
	if sink.Count() != 0 {
		t.Error("a message went out without a token")
	}
	dead, err := os.ReadFile(filepath.Join(h.spool, "dead", id+".msg"))
	if err != nil {
		t.Fatal(err)
	}
	_, metrics := h.get("/metrics")
	_, api := h.get("/api/dead")
	assertNoSecrets(t, h, []string{m365Secret}, map[string][]byte{"dead letter": dead, "/metrics": metrics, "/api/dead": api})
	if v := h.metric("relaycar_deliveries_total", "upstream=m365-smtp", "result=provider_fault"); v < 1 {
		t.Errorf("deliveries{provider_fault} = %v, want >= 1", v)
	}
}

// assertNoSecrets fails if any secret appears in the relay's log or in any
// of the named documents.
func assertNoSecrets(t *testing.T, h *harness, secrets []string, docs map[string][]byte) {
	t.Helper()
	h.mu.Lock()
	logs := strings.Join(h.lines, "\n")
	h.mu.Unlock()
	for _, s := range secrets {
		if s == "" {
			continue
		}
		if strings.Contains(logs, s) {
			t.Errorf("secret %.12s… in the relay's log", s)
		}
		for name, d := range docs {
			if bytes.Contains(d, []byte(s)) {
				t.Errorf("secret %.12s… in %s", s, name)
			}
		}
	}
}
