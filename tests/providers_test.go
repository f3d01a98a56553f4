package tests

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

const (
	mgDomain     = "mg.example.com"
	mgProviderID = "<2026.mg@mg.example.com>"
	sesPath      = "/v2/email/outbound-emails"
	sendGridPath = "/v3/mail/send"
	mailgunPath  = "/v3/" + mgDomain + "/messages.mime"
)

// mailgunReq is one decoded messages.mime request: the repeated `to` form
// fields and the `message` file part.
type mailgunReq struct {
	to      []string
	message []byte
}

// decodeMailgun parses a multipart/form-data messages.mime request the
// Mailgun fake recorded.
func decodeMailgun(t *testing.T, r fakes.Request) mailgunReq {
	t.Helper()
	if r.Method != http.MethodPost || r.Path != mailgunPath {
		t.Errorf("mailgun fake got %s %s, want POST %s", r.Method, r.Path, mailgunPath)
	}
	parts, err := fakes.MultipartForm(r)
	if err != nil {
		t.Fatalf("mailgun fake: %v", err)
	}
	var out mailgunReq
	for _, p := range parts {
		switch p.Name {
		case "to":
			out.to = append(out.to, string(p.Data))
		case "message":
			if out.message != nil {
				t.Error("mailgun fake: more than one `message` part")
			}
			if p.FileName == "" {
				t.Error("mailgun fake: `message` is not a file part")
			}
			out.message = p.Data
		}
	}
	if out.message == nil {
		t.Fatal("mailgun fake: request without a `message` file part")
	}
	return out
}

// checkPaths fails the test for any request a fake got other than POST path.
func checkPaths(t *testing.T, name string, f *fakes.HTTP, path string) {
	t.Helper()
	for _, r := range f.Requests() {
		if r.Method != http.MethodPost || r.Path != path {
			t.Errorf("%s fake got %s %s, want POST %s", name, r.Method, r.Path, path)
		}
	}
}

// TestFailover_SESThenSendGridThenMailgun runs a failover route over three
// provider API fakes answering in each provider's documented format: SES
// throttles (transient), SendGrid refuses the key (provider fault, its
// breaker opens at once), Mailgun takes the message.
func TestFailover_SESThenSendGridThenMailgun(t *testing.T) {
	t.Parallel()
	notFound := fakes.JSON(http.StatusNotFound, `{"message":"not found"}`)
	ses := fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
		if r.Method != http.MethodPost || r.Path != sesPath {
			return notFound
		}
		return fakes.Reply{
			Status: http.StatusTooManyRequests,
			Header: map[string]string{
				"Content-Type":     "application/json",
				"x-amzn-ErrorType": "TooManyRequestsException",
				"x-amzn-RequestId": "req-ses-1",
			},
			Body: `{"message":"Maximum sending rate exceeded."}`,
		}
	})
	sendgrid := fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
		if r.Method != http.MethodPost || r.Path != sendGridPath {
			return notFound
		}
		return fakes.JSON(http.StatusUnauthorized,
			`{"errors":[{"message":"The provided authorization grant is invalid, expired, or revoked","field":null,"help":null}]}`)
	})
	mailgun := fakes.NewHTTP(t, func(_ int, r fakes.Request) fakes.Reply {
		if r.Method != http.MethodPost || r.Path != mailgunPath {
			return notFound
		}
		return fakes.JSON(http.StatusOK, `{"id":"`+mgProviderID+`","message":"Queued. Thank you."}`)
	})

	h := newHarness(t, fmt.Sprintf(`
upstreams:
  - name: ses
    type: ses
    region: us-east-1
    access_key_id: AKIAIOSFODNN7EXAMPLE
    secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
    endpoint: %q
  - name: sendgrid
    type: sendgrid
    api_key: SG.dummy-key-for-tests
    endpoint: %q
    circuit_breaker: {failures: 5, open_for: 60s}
  - name: mailgun
    type: mailgun
    domain: %s
    api_key: key-dummy-for-tests
    endpoint: %q
routes:
  - {name: default, upstreams: [ses, sendgrid, mailgun], strategy: failover}
`, ses.URL, sendgrid.URL, mgDomain, mailgun.URL))

	// First message: SES 429 -> SendGrid 401 -> Mailgun 200.
	const subject1 = "Failover across three providers"
	data1 := message(sender, recipient, 1, subject1)
	msgID1 := header(t, []byte(data1), "Message-ID")
	id1 := h.mustSend(sender, []string{recipient}, data1)

	waitFor(t, 10*time.Second, "the first message at the mailgun fake", func() bool { return len(mailgun.Requests()) >= 1 })
	time.Sleep(time.Second) // a second copy would show up by now
	reqs := mailgun.Requests()
	if len(reqs) != 1 {
		t.Fatalf("mailgun fake received %d requests, want exactly 1", len(reqs))
	}
	got := decodeMailgun(t, reqs[0])
	if !slices.Equal(got.to, []string{recipient}) {
		t.Errorf("mailgun `to` fields = %q, want the envelope recipient [%s]", got.to, recipient)
	}
	if !strings.Contains(string(got.message), "Subject: "+subject1) {
		t.Errorf("mailgun MIME has no Subject %q:\n%s", subject1, got.message)
	}
	if !strings.Contains(string(got.message), msgID1) {
		t.Errorf("mailgun MIME has no Message-ID %s:\n%s", msgID1, got.message)
	}
	if v := header(t, got.message, "Message-ID"); v != msgID1 {
		t.Errorf("mailgun MIME Message-ID = %q, want %q", v, msgID1)
	}
	if n := len(ses.Requests()); n < 1 {
		t.Errorf("ses fake received %d requests, want >= 1", n)
	}
	if n := len(sendgrid.Requests()); n != 1 {
		t.Errorf("sendgrid fake received %d requests, want exactly 1", n)
	}

	h.waitSpoolEmpty(10 * time.Second)
	if v := h.metric("relaycar_deliveries_total", "upstream=ses", "result=transient"); v < 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="ses",result="transient"} = %v, want >= 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=sendgrid", "result=provider_fault"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="sendgrid",result="provider_fault"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=mailgun", "result=delivered"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="mailgun",result="delivered"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_upstream_breaker_state", "upstream=sendgrid"); v != 2 {
		t.Errorf(`relaycar_upstream_breaker_state{upstream="sendgrid"} = %v, want 2 (open after a provider fault)`, v)
	}
	if ids := h.spoolIDs(); len(ids) != 0 {
		t.Errorf("spool not empty after delivery: %v", ids)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters on disk: %v", ids)
	}

	// The relay logs the provider's id for the delivery.
	var line string
	h.mu.Lock()
	for _, l := range h.lines {
		if strings.Contains(l, "message delivered") && strings.Contains(l, "msg_id="+id1) {
			line = l
			break
		}
	}
	h.mu.Unlock()
	switch {
	case line == "":
		t.Errorf(`no "message delivered" log line with msg_id=%s`, id1)
	case !strings.Contains(line, "upstream=mailgun"):
		t.Errorf(`"message delivered" line does not name upstream=mailgun: %s`, line)
	case !strings.Contains(line, "provider_id="+mgProviderID) && !strings.Contains(line, `provider_id="`+mgProviderID+`"`):
		t.Errorf(`"message delivered" line has no provider_id=%s: %s`, mgProviderID, line)
	}

	// Second message: the SendGrid breaker is open, so SendGrid is skipped
	// and the message goes to Mailgun again.
	const subject2 = "Second message while the SendGrid breaker is open"
	data2 := message(sender, recipient, 2, subject2)
	msgID2 := header(t, []byte(data2), "Message-ID")
	h.mustSend(sender, []string{recipient}, data2)

	waitFor(t, 10*time.Second, "the second message at the mailgun fake", func() bool { return len(mailgun.Requests()) >= 2 })
	time.Sleep(time.Second)
	reqs = mailgun.Requests()
	if len(reqs) != 2 {
		t.Fatalf("mailgun fake received %d requests in all, want exactly 2", len(reqs))
	}
	got = decodeMailgun(t, reqs[1])
	if !slices.Equal(got.to, []string{recipient}) {
		t.Errorf("second mailgun `to` fields = %q, want [%s]", got.to, recipient)
	}
	if v := header(t, got.message, "Message-ID"); v != msgID2 {
		t.Errorf("second mailgun MIME Message-ID = %q, want %q", v, msgID2)
	}
	if !strings.Contains(string(got.message), "Subject: "+subject2) {
		t.Errorf("second mailgun MIME has no Subject %q:\n%s", subject2, got.message)
	}
	if n := len(sendgrid.Requests()); n != 1 {
		t.Errorf("sendgrid fake received %d requests in all, want 1 (breaker open for the second message)", n)
	}
	h.waitSpoolEmpty(10 * time.Second)
	if v := h.metric("relaycar_deliveries_total", "upstream=sendgrid", "result=provider_fault"); v != 1 {
		t.Errorf(`relaycar_deliveries_total{upstream="sendgrid",result="provider_fault"} = %v after the second message, want 1`, v)
	}
	if v := h.metric("relaycar_deliveries_total", "upstream=mailgun", "result=delivered"); v != 2 {
		t.Errorf(`relaycar_deliveries_total{upstream="mailgun",result="delivered"} = %v after the second message, want 2`, v)
	}
	if v := h.metric("relaycar_upstream_breaker_state", "upstream=sendgrid"); v != 2 {
		t.Errorf(`relaycar_upstream_breaker_state{upstream="sendgrid"} = %v after the second message, want 2`, v)
	}

	checkPaths(t, "ses", ses, sesPath)
	checkPaths(t, "sendgrid", sendgrid, sendGridPath)
	checkPaths(t, "mailgun", mailgun, mailgunPath)
}
