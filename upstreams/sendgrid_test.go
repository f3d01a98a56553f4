package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"
)

const sgTestKey = "SG.test-key.0123456789"

// newTestSendGrid builds the adapter against f (or endpoint) with a short timeout.
func newTestSendGrid(t *testing.T, endpoint, key string, timeout time.Duration, log *slog.Logger) *sendGridUpstream {
	t.Helper()
	u, err := build(Config{Name: "sendgrid", Type: "sendgrid", APIKey: Secret(key), Endpoint: endpoint, Timeout: timeout},
		Deps{Logger: log})
	if err != nil {
		t.Fatalf("newSendGrid: %v", err)
	}
	return u.(*sendGridUpstream)
}

// sgMessage turns a readable message (LF line ends) into one with CRLF.
func sgMessage(from string, to []string, text string) *Message {
	data := strings.ReplaceAll(strings.TrimLeft(text, "\n"), "\n", "\r\n")
	return &Message{ID: "msg-1", From: from, To: to, Body: BytesBody([]byte(data)), MessageID: "<m1@example.com>"}
}

const sgRichMessage = `
Received: from app.internal by relay.local; Sun, 22 Nov 2026 10:00:00 +0000
DKIM-Signature: v=1; a=rsa-sha256; d=example.com; b=xyz
From: "Alice Example" <alice@example.com>
To: Bob <bob@example.net>, "Doe, Jane" <jane@example.net>, other@elsewhere.example
Cc: "Ops; Team" <ops@example.org>
Bcc: hidden@example.org
Reply-To: replies@example.com
Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= from relaycar
Message-ID: <m1@example.com>
X-Campaign: spring
X-Campaign: summer
List-Unsubscribe: <mailto:unsub@example.com>,
 <https://example.com/u/1>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Gr=FC=DFe
--alt
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: text/html; charset=utf-8

<p>Hi <img src="cid:logo+1@x"></p>
--rel
Content-Type: image/png
Content-ID: <logo+1@x>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--rel--
--alt--
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--outer--
`

func TestSendGrid_SendMapsRequest(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	m := sgMessage("bounce@example.com",
		[]string{"bob@example.net", "jane@example.net", "ops@example.org", "hidden@example.org", "env-only@example.com"},
		sgRichMessage)

	rc, err := sg.Send(context.Background(), m)
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	f.AssertValid(t)
	if id != "fake-1" {
		t.Errorf("provider id = %q, want the X-Message-Id fake-1", id)
	}
	reqs := f.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if got := r.Header.Get("Authorization"); got != "Bearer "+sgTestKey {
		t.Errorf("Authorization = %q", got)
	}
	if got := r.Header.Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type = %q", got)
	}
	q := r.Req
	if q.From.Name != "Alice Example" || q.From.Email != "alice@example.com" {
		t.Errorf("from = %+v", q.From)
	}
	if *q.Subject != "Grüße from relaycar" {
		t.Errorf("subject = %q", *q.Subject)
	}
	if q.ReplyTo == nil || q.ReplyTo.Email != "replies@example.com" || q.ReplyToList != nil {
		t.Errorf("reply_to = %+v, reply_to_list = %+v", q.ReplyTo, q.ReplyToList)
	}
	p := q.Personalizations[0]
	if got := fmt.Sprint(p.To); got != "[{Bob bob@example.net} { jane@example.net}]" {
		t.Errorf("to = %s (names with ',' dropped, To addresses outside the envelope left out)", got)
	}
	if got := fmt.Sprint(p.CC); got != "[{ ops@example.org}]" {
		t.Errorf("cc = %s", got)
	}
	if got := fmt.Sprint(p.BCC); got != "[{ hidden@example.org} { env-only@example.com}]" {
		t.Errorf("bcc = %s", got)
	}
	if len(q.Content) != 2 || *q.Content[0].Type != "text/plain" || *q.Content[0].Value != "Grüße" ||
		*q.Content[1].Type != "text/html" || *q.Content[1].Value != `<p>Hi <img src="cid:logo+1@x"></p>` {
		t.Errorf("content = %s", r.Body)
	}
	if len(q.Attachments) != 2 {
		t.Fatalf("attachments = %d, want 2: %s", len(q.Attachments), r.Body)
	}
	inline, pdf := q.Attachments[0], q.Attachments[1]
	if inline.Disposition != "inline" || inline.ContentID != "logo+1@x" || *inline.Type != "image/png" ||
		*inline.Content != "iVBORw0KGgo=" || *inline.Filename != "inline-1.png" {
		t.Errorf("inline image = %+v", inline)
	}
	if pdf.Disposition != "attachment" || *pdf.Filename != "report.pdf" || *pdf.Type != "application/pdf" ||
		*pdf.Content != base64.StdEncoding.EncodeToString([]byte("%PDF-1.4\n")) {
		t.Errorf("pdf = %+v", pdf)
	}
	wantHeaders := map[string]string{
		"Message-ID":       "<m1@example.com>",
		"X-Campaign":       "spring",
		"List-Unsubscribe": "<mailto:unsub@example.com>, <https://example.com/u/1>",
	}
	if fmt.Sprint(q.Headers) != fmt.Sprint(wantHeaders) {
		t.Errorf("headers = %v\nwant %v", q.Headers, wantHeaders)
	}
}

func TestSendGrid_DefaultEndpointAndValidation(t *testing.T) {
	t.Parallel()
	sg := newTestSendGrid(t, "", sgTestKey, 0, nil)
	if sg.host != "https://api.sendgrid.com" || sg.timeout != 30*time.Second {
		t.Errorf("host, timeout = %q, %s", sg.host, sg.timeout)
	}
	if sg.client.HTTPClient == nil || sg.client.HTTPClient.Timeout != 30*time.Second {
		t.Errorf("http client must carry the timeout")
	}
	if _, err := build(Config{Name: "sg", Type: "sendgrid"}, Deps{}); err == nil {
		t.Error("missing api_key accepted")
	}
	if _, err := build(Config{Name: "sg", Type: "sendgrid", APIKey: "k", Endpoint: "api.example.com"}, Deps{}); err == nil {
		t.Error("relative endpoint accepted")
	}
}

// sgExpected is the documented classification of each status, written out
// independently of the code under test.
func sgExpected(code int) (ok bool, class Class) {
	switch {
	case code >= 200 && code < 300:
		return true, 0
	case code == 401:
		return false, ProviderFault
	case code == 403:
		return false, ProviderFault // generic 403 body: key scope, blocked account
	case code == 413:
		return false, Unsupported // too big for SendGrid; another upstream may take it
	case code == 400, code == 422:
		return false, Rejected
	case code == 408, code == 429:
		return false, Transient
	case code >= 500:
		return false, Transient
	case code >= 400:
		return false, ProviderFault
	}
	return false, Transient // 3xx without Location
}

func TestSendGrid_StatusSweep(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	for code := 200; code <= 599; code++ {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			body := `{"errors":[{"message":"status ` + fmt.Sprint(code) + `","field":null}]}`
			f.Script(sgAnswer{Status: code, Body: body, Header: map[string]string{"X-Message-Id": "sweep"}})
			_, err := sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
				"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
			ok, class := sgExpected(code)
			if ok {
				if err != nil {
					t.Fatalf("status %d: %v, want success", code, err)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("status %d: err = %v, want *Error", code, err)
			}
			if e.Class != class || e.Code != fmt.Sprint(code) {
				t.Errorf("status %d: class %s code %q, want %s", code, e.Class, e.Code, class)
			}
			if code != 429 && code != 304 && code != 204 && !strings.Contains(e.Reason, fmt.Sprintf("status %d", code)) {
				t.Errorf("status %d: reason %q does not carry SendGrid's message", code, e.Reason)
			}
		})
	}
	f.AssertValid(t)
}

func TestSendGrid_403UnverifiedSenderIsSenderRejected(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, body string
		want       Class
	}{
		{"field from", `{"errors":[{"message":"Forbidden","field":"from"}]}`, SenderRejected},
		{"verified sender identity", `{"errors":[{"message":"The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved.","field":null,"help":"https://sendgrid.com/docs/for-developers/sending-email/sender-identity/"}]}`, SenderRejected},
		{"key scope", `{"errors":[{"message":"access forbidden","field":null}]}`, ProviderFault},
		{"blocked", `{"errors":[{"message":"You are temporarily blocked due to repeated bad requests.","field":null}]}`, ProviderFault},
		{"not json", `<html>Forbidden</html>`, ProviderFault},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeSendGrid(t, sgTestKey)
			sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
			f.Script(sgAnswer{Status: 403, Body: c.body})
			_, err := sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
				"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
			if got := ClassOf(err); got != c.want {
				t.Errorf("class = %s, want %s (%v)", got, c.want, err)
			}
		})
	}
}

// SendGrid throttles the account: the reason says until when.
func TestSendGrid_429ReasonHasReset(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	f.Script(sgAnswer{Status: 429, Body: `{"errors":[{"field":null,"message":"too many requests"}]}`,
		Header: map[string]string{"X-RateLimit-Reset": "1795341600", "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0"}})
	_, err := sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
		"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
	var e *Error
	if !errors.As(err, &e) || e.Class != Transient {
		t.Fatalf("err = %v, want transient", err)
	}
	if want := "rate limited until " + time.Unix(1795341600, 0).UTC().Format(time.RFC3339) + ": too many requests"; e.Reason != want {
		t.Errorf("reason = %q, want %q", e.Reason, want)
	}
}

// A misbehaving proxy echoes the Authorization header, and another never
// answers: the key must not reach the error or the log either way.
func TestSendGrid_SecretNeverLeaks(t *testing.T) {
	t.Parallel()
	const key = "SG.LEAKCHECK-7f3a9c.Zx81Qw"
	for _, c := range []struct {
		name string
		a    sgAnswer
		want Class
	}{
		{"echoed in 401 body", sgAnswer{Status: 401, EchoAuth: true}, ProviderFault},
		{"echoed in 400 body", sgAnswer{Status: 400, EchoAuth: true}, Rejected},
		{"hangs past timeout", sgAnswer{Hang: true}, Ambiguous},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			f := newFakeSendGrid(t, key)
			sg := newTestSendGrid(t, f.URL, key, 300*time.Millisecond, log)
			f.Script(c.a)
			_, err := sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
				"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
			if err == nil {
				t.Fatal("Send succeeded")
			}
			if got := ClassOf(err); got != c.want {
				t.Errorf("class = %s, want %s (%v)", got, c.want, err)
			}
			log.Error("delivery attempt failed", slog.Any("err", err), slog.String("msg_id", "msg-1"))
			log.Warn("delivery attempt failed", "err", err)
			for where, s := range map[string]string{
				"err.Error()":  err.Error(),
				"%+v":          fmt.Sprintf("%+v", err),
				"wrapped":      fmt.Sprint(errors.Unwrap(err)),
				"log":          logs.String(),
				"error reason": err.(*Error).Reason,
			} {
				if strings.Contains(s, key) || strings.Contains(s, "LEAKCHECK") {
					t.Errorf("API key leaked into %s: %s", where, s)
				}
			}
			if !strings.Contains(logs.String(), "delivery attempt failed") {
				t.Error("log capture did not work")
			}
		})
	}
}

// Nothing listens: the request never left, so another upstream may take it.
func TestSendGrid_ConnectionRefusedIsTransient(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	sg := newTestSendGrid(t, "http://"+addr, sgTestKey, 2*time.Second, nil)
	_, err = sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
		"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
	var e *Error
	if !errors.As(err, &e) || e.Class != Transient {
		t.Fatalf("err = %v, want transient", err)
	}
	if strings.Contains(e.Reason, "http://") {
		t.Errorf("reason quotes the URL: %q", e.Reason)
	}
}

// bulkMessage has three To recipients in its header and n envelope
// recipients in all: the rest are envelope-only (bcc).
func bulkMessage(n int) *Message {
	rcpts := make([]string, n)
	for i := range rcpts {
		rcpts[i] = fmt.Sprintf("user%04d@example.net", i)
	}
	return sgMessage("news@example.com", rcpts,
		"From: news@example.com\nTo: user0000@example.net, user0001@example.net, user0002@example.net\nCc: user0003@example.net\nSubject: bulk\n\nhello\n")
}

func TestSendGrid_SplitsAt1000Recipients(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	m := bulkMessage(2500)
	rc, err := sg.Send(context.Background(), m)
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	f.AssertValid(t)
	if id != "fake-1,fake-2,fake-3" {
		t.Errorf("id = %q", id)
	}
	reqs := f.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	got := map[string]int{}
	for i, r := range reqs {
		if len(r.Req.Personalizations) != 1 {
			t.Fatalf("request %d: %d personalizations", i, len(r.Req.Personalizations))
		}
		p := r.Req.Personalizations[0]
		if n := len(p.To) + len(p.CC) + len(p.BCC); n > 1000 {
			t.Errorf("request %d has %d recipients", i, n)
		}
		for _, l := range [][]sgWireEmail{p.To, p.CC, p.BCC} {
			for _, e := range l {
				got[e.Email]++
			}
		}
	}
	if len(got) != 2500 {
		t.Errorf("%d distinct recipients sent, want 2500", len(got))
	}
	for e, n := range got {
		if n != 1 {
			t.Errorf("%s sent %d times", e, n)
		}
	}
}

// The provider takes the first 1,000 and then fails: only the rest may be
// retried, or the first 1,000 would get the message twice.
func TestSendGrid_PartialFailureNamesUndelivered(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	f.Script(sgAnswer{}, sgAnswer{Status: 503, Body: `{"errors":[{"message":"service unavailable"}]}`})
	m := bulkMessage(2500)
	rc, err := sg.Send(context.Background(), m)
	if e := refusedErr(t, rc, err); e.Class != Transient {
		t.Fatalf("refusal = %v, want transient", e)
	}
	if rc.ProviderID != "fake-1" {
		t.Errorf("ProviderID = %q, want fake-1", rc.ProviderID)
	}
	undelivered := rc.RefusedRcpts()
	reqs := f.Requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests, want 2 (stop at the first failure)", len(reqs))
	}
	delivered := map[string]bool{}
	p := reqs[0].Req.Personalizations[0]
	for _, l := range [][]sgWireEmail{p.To, p.CC, p.BCC} {
		for _, x := range l {
			delivered[x.Email] = true
		}
	}
	if len(undelivered) != 1500 {
		t.Errorf("%d undelivered recipients, want 1500", len(undelivered))
	}
	for _, r := range undelivered {
		if delivered[r] {
			t.Errorf("%s was delivered but is listed as undelivered", r)
		}
	}
	if len(delivered)+len(undelivered) != 2500 {
		t.Errorf("delivered %d + undelivered %d != 2500", len(delivered), len(undelivered))
	}
}

// Messages SendGrid's JSON cannot carry are refused before any request,
// with the class that sends them to the next upstream.
func TestSendGrid_UnsupportedIsRefusedBeforeSending(t *testing.T) {
	t.Parallel()
	hdr := "From: a@example.com\nTo: b@example.net\nSubject: s\nMIME-Version: 1.0\n"
	cases := []struct {
		name string
		from string
		to   []string
		data string
	}{
		{"multipart/signed", "", nil, hdr + "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=b\n\n--b\nContent-Type: text/plain\n\nsigned\n--b\nContent-Type: application/pkcs7-signature; name=smime.p7s\nContent-Disposition: attachment; filename=smime.p7s\nContent-Transfer-Encoding: base64\n\nAAEC\n--b--\n"},
		{"multipart/encrypted", "", nil, hdr + "Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=b\n\n--b\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n--b\nContent-Type: application/octet-stream\n\n-----BEGIN PGP MESSAGE-----\n--b--\n"},
		{"application/pkcs7-mime", "", nil, hdr + "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\nContent-Disposition: attachment; filename=smime.p7m\nContent-Transfer-Encoding: base64\n\nAAEC\n"},
		{"two text/plain bodies", "", nil, hdr + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\none\n--b\nContent-Type: text/plain\n\ntwo\n--b--\n"},
		{"two text/html bodies", "", nil, hdr + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>one</p>\n--b\nContent-Type: text/html\n\n<p>two</p>\n--b--\n"},
		{"text and html not alternatives", "", nil, hdr + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\none\n--b\nContent-Type: text/html\n\n<p>two</p>\n--b--\n"},
		{"text/calendar alternative", "", nil, hdr + "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\n\ninvite\n--b\nContent-Type: text/calendar; method=REQUEST\n\nBEGIN:VCALENDAR\nEND:VCALENDAR\n--b--\n"},
		{"text/enriched alternative", "", nil, hdr + "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: text/enriched\n\n<bold>hi</bold>\n--b--\n"},
		{"text/watch-html alternative", "", nil, hdr + "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: text/watch-html\n\n<b>hi</b>\n--b--\n"},
		{"multipart/report", "", nil, hdr + "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\nContent-Type: text/plain\n\nfailed\n--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n--b--\n"},
		{"unicode local part in From", "jörg@example.com", nil, "From: jörg@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"},
		{"unicode local part in recipient", "", []string{"jörg@example.net"}, "From: a@example.com\nTo: jörg@example.net\nSubject: s\n\nbody\n"},
		{"only bcc recipients", "", []string{"x@example.net"}, "From: a@example.com\nTo: undisclosed-recipients:;\nSubject: s\n\nbody\n"},
		{"no subject", "", nil, "From: a@example.com\nTo: b@example.net\n\nbody\n"},
		{"empty body", "", nil, "From: a@example.com\nTo: b@example.net\nSubject: s\n\n"},
		{"empty attachment", "", nil, hdr + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nsee file\n--b\nContent-Type: text/csv\nContent-Disposition: attachment; filename=empty.csv\n\n\n--b--\n"},
		{"several From addresses", "", nil, "From: a@example.com, c@example.com\nSender: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"},
		{"unknown charset", "", nil, hdr + "Content-Type: text/plain; charset=x-no-such-charset\nContent-Transfer-Encoding: 8bit\n\nbody \xff\xfe\n"},
		{"unknown transfer encoding", "", nil, hdr + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nsee file\n--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\nContent-Transfer-Encoding: x-uuencode\n\nbegin 644 a.pdf\n--b--\n"},
		{"over 1000 recipients with one To", "", func() []string {
			r := []string{"b@example.net"}
			for i := range 1200 {
				r = append(r, fmt.Sprintf("u%d@example.net", i))
			}
			return r
		}(), "From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeSendGrid(t, sgTestKey)
			sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
			from, to := c.from, c.to
			if from == "" {
				from = "a@example.com"
			}
			if to == nil {
				to = []string{"b@example.net"}
			}
			_, err := sg.Send(context.Background(), sgMessage(from, to, c.data))
			var e *Error
			if !errors.As(err, &e) || e.Class != Unsupported {
				t.Fatalf("err = %v, want class unsupported", err)
			}
			t.Logf("reason: %s", e.Reason)
			if e.Reason == "" || e.Upstream != "sendgrid" {
				t.Errorf("error = %+v", e)
			}
			if n := len(f.Requests()); n != 0 {
				t.Errorf("%d requests sent for an unsupported message", n)
			}
		})
	}
}

func TestSendGrid_AddressEdgeCases(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	// IDN domains become A-labels; duplicates across To/Cc/envelope are sent
	// once; several Reply-To become reply_to_list; a missing From header
	// falls back to the envelope sender.
	m := sgMessage("sender@example.com",
		[]string{"user@bücher.example", "B@Example.net", "b@example.net", "c@example.net"},
		"To: Bücher <user@bücher.example>, b@example.net\nCc: B@example.NET, c@example.net\nReply-To: r1@example.com, R2 <r2@example.com>, r1@example.com\nSubject: s\n\nbody\n")
	if _, err := sg.Send(context.Background(), m); err != nil {
		t.Fatalf("Send: %v", err)
	}
	f.AssertValid(t)
	q := f.Requests()[0].Req
	p := q.Personalizations[0]
	if got := fmt.Sprint(p.To, p.CC, p.BCC); got != "[{Bücher user@xn--bcher-kva.example} { b@example.net}] [{ c@example.net}] []" {
		t.Errorf("to cc bcc = %s", got)
	}
	if q.From.Email != "sender@example.com" {
		t.Errorf("from = %+v", q.From)
	}
	if q.ReplyTo != nil || fmt.Sprint(q.ReplyToList) != "[{ r1@example.com} {R2 r2@example.com}]" {
		t.Errorf("reply_to %+v reply_to_list %+v", q.ReplyTo, q.ReplyToList)
	}
	if _, ok := q.Headers["MIME-Version"]; ok {
		t.Error("MIME-Version sent as a custom header")
	}
}

// A text attachment in a legacy charset keeps its bytes; the body is
// converted to UTF-8 for the JSON.
func TestSendGrid_TextAttachmentKeepsBytes(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	m := sgMessage("a@example.com", []string{"b@example.net"},
		"From: a@example.com\nTo: b@example.net\nSubject: s\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\nGr=F6=DFe\n--b\nContent-Type: text/plain; charset=iso-8859-1\nContent-Disposition: attachment; filename=\"l1.txt\"\nContent-Transfer-Encoding: quoted-printable\n\nGr=F6=DFe\n--b--\n")
	if _, err := sg.Send(context.Background(), m); err != nil {
		t.Fatalf("Send: %v", err)
	}
	f.AssertValid(t)
	q := f.Requests()[0].Req
	if *q.Content[0].Value != "Größe" {
		t.Errorf("body = %q", *q.Content[0].Value)
	}
	if got := *q.Attachments[0].Content; got != base64.StdEncoding.EncodeToString([]byte("Gr\xf6\xdfe")) {
		t.Errorf("attachment = %q, want the ISO-8859-1 bytes", got)
	}
}

// A message over SendGrid's size limit would be refused with 413 after the
// upload; refusing it first lets a raw upstream with a larger limit take
// it without sending 30 MB for nothing.
func TestSendGrid_TooLargeIsUnsupported(t *testing.T) {
	t.Parallel()
	f := newFakeSendGrid(t, sgTestKey)
	sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
	sg.maxBody = 300
	_, err := sg.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
		"From: a@example.com\nTo: b@example.net\nSubject: s\n\n"+strings.Repeat("<p>big</p>\n", 40)))
	if got := ClassOf(err); got != Unsupported {
		t.Fatalf("class = %s, want unsupported (%v)", got, err)
	}
	if n := len(f.Requests()); n != 0 {
		t.Errorf("%d requests sent", n)
	}
}
