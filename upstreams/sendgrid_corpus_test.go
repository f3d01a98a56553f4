package upstreams

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sgWant is a .want.json of testdata/sendgrid-corpus, written by
// generate.sh from the inputs it gave nodemailer or Python's email package.
type sgWant struct {
	Source   string `json:"source"`
	Envelope struct {
		From string   `json:"from"`
		To   []string `json:"to"`
	} `json:"envelope"`
	Unsupported bool          `json:"unsupported"`
	Why         string        `json:"why"`
	From        sgWireEmail   `json:"from"`
	ReplyTo     []sgWireEmail `json:"reply_to"`
	Subject     string        `json:"subject"`
	To          []sgWireEmail `json:"to"`
	CC          []sgWireEmail `json:"cc"`
	BCC         []sgWireEmail `json:"bcc"`
	Text        string        `json:"text"`
	HTML        string        `json:"html"`
	Attachments []struct {
		Filename    *string `json:"filename"`
		Type        string  `json:"type"`
		SHA256      string  `json:"sha256"`
		Disposition string  `json:"disposition"`
		ContentID   *string `json:"content_id"`
	} `json:"attachments"`
	Headers       map[string]string `json:"headers"`
	HeadersAbsent []string          `json:"headers_absent"`
}

// sgText compares bodies modulo line-end form (the libraries write CRLF)
// and trailing newlines (Python's set_content adds one).
func sgText(s string) string {
	return strings.TrimRight(strings.ReplaceAll(s, "\r\n", "\n"), "\n")
}

func TestSendGrid_CorpusMappingFidelity(t *testing.T) {
	t.Parallel()
	emls, err := filepath.Glob(filepath.Join("testdata", "sendgrid-corpus", "*.eml"))
	if err != nil || len(emls) == 0 {
		t.Fatalf("no corpus (run testdata/sendgrid-corpus/generate.sh): %v", err)
	}
	for _, eml := range emls {
		name := strings.TrimSuffix(filepath.Base(eml), ".eml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			data, err := os.ReadFile(eml)
			if err != nil {
				t.Fatal(err)
			}
			wb, err := os.ReadFile(strings.TrimSuffix(eml, ".eml") + ".want.json")
			if err != nil {
				t.Fatal(err)
			}
			var w sgWant
			if err := json.Unmarshal(wb, &w); err != nil {
				t.Fatal(err)
			}
			f := newFakeSendGrid(t, sgTestKey)
			sg := newTestSendGrid(t, f.URL, sgTestKey, 5*time.Second, nil)
			m := &Message{ID: name, From: w.Envelope.From, To: w.Envelope.To, Body: BytesBody(data), MessageID: w.Headers["Message-ID"]}
			_, err = sg.Send(context.Background(), m)

			if w.Unsupported {
				var e *Error
				if !errors.As(err, &e) || e.Class != Unsupported {
					t.Fatalf("%s (%s): err = %v, want class unsupported", w.Why, w.Source, err)
				}
				t.Logf("%s: %s", w.Why, e.Reason)
				if n := len(f.Requests()); n != 0 {
					t.Errorf("%d requests sent for an unsupported message", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("Send (%s): %v", w.Source, err)
			}
			f.AssertValid(t)
			reqs := f.Requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			q := reqs[0].Req
			p := q.Personalizations[0]

			if *q.From != w.From {
				t.Errorf("from = %+v, want %+v", *q.From, w.From)
			}
			var rt []sgWireEmail
			if q.ReplyTo != nil {
				rt = []sgWireEmail{*q.ReplyTo}
				if len(w.ReplyTo) != 1 {
					t.Errorf("reply_to used for %d addresses", len(w.ReplyTo))
				}
			} else {
				rt = q.ReplyToList
				if len(w.ReplyTo) == 1 {
					t.Errorf("reply_to_list used for one address")
				}
			}
			sgSameEmails(t, "reply_to", rt, w.ReplyTo)
			if q.Subject == nil || *q.Subject != w.Subject {
				t.Errorf("subject = %v, want %q", q.Subject, w.Subject)
			}
			sgSameEmails(t, "to", p.To, w.To)
			sgSameEmails(t, "cc", p.CC, w.CC)
			sgSameEmails(t, "bcc", p.BCC, w.BCC)

			var text, html string
			for _, c := range q.Content {
				switch *c.Type {
				case "text/plain":
					text = *c.Value
				case "text/html":
					html = *c.Value
				default:
					t.Errorf("unexpected content type %q", *c.Type)
				}
			}
			if sgText(text) != sgText(w.Text) {
				t.Errorf("text = %q\nwant %q", text, w.Text)
			}
			if sgText(html) != sgText(w.HTML) {
				t.Errorf("html = %q\nwant %q", html, w.HTML)
			}

			if len(q.Attachments) != len(w.Attachments) {
				t.Errorf("%d attachments sent, want %d", len(q.Attachments), len(w.Attachments))
			}
			sent := map[string]sgWireAttach{}
			for _, a := range q.Attachments {
				b, err := base64.StdEncoding.DecodeString(*a.Content)
				if err != nil {
					t.Fatalf("attachment %v: %v", a.Filename, err)
				}
				sum := sha256.Sum256(b)
				sent[hex.EncodeToString(sum[:])] = a
			}
			for _, wa := range w.Attachments {
				a, ok := sent[wa.SHA256]
				if !ok {
					t.Errorf("attachment %v (%s): bytes not sent unchanged", sgDeref(wa.Filename), wa.Type)
					continue
				}
				if wa.Filename != nil && *a.Filename != *wa.Filename {
					t.Errorf("attachment filename = %q, want %q", *a.Filename, *wa.Filename)
				}
				if *a.Filename == "" {
					t.Errorf("attachment %s has no filename", wa.Type)
				}
				if *a.Type != wa.Type {
					t.Errorf("attachment %q type = %q, want %q", *a.Filename, *a.Type, wa.Type)
				}
				if a.Disposition != wa.Disposition {
					t.Errorf("attachment %q disposition = %q, want %q", *a.Filename, a.Disposition, wa.Disposition)
				}
				if a.ContentID != sgDeref(wa.ContentID) {
					t.Errorf("attachment %q content_id = %q, want %q", *a.Filename, a.ContentID, sgDeref(wa.ContentID))
				}
			}

			for k, v := range w.Headers {
				got, ok := sgHeader(q.Headers, k)
				if !ok {
					t.Errorf("header %s not sent", k)
				} else if got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			for _, k := range w.HeadersAbsent {
				if _, ok := sgHeader(q.Headers, k); ok {
					t.Errorf("header %s must not be sent", k)
				}
			}
		})
	}
}

func sgHeader(h map[string]string, name string) (string, bool) {
	for k, v := range h {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return "", false
}

func sgSameEmails(t *testing.T, field string, got, want []sgWireEmail) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s = %+v, want %+v", field, got, want)
		return
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("%s[%d] = %+v, want %+v", field, i, got[i], want[i])
		}
	}
}

func sgDeref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
