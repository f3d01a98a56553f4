package upstreams

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeSendGrid is an in-process POST /v3/mail/send that validates each
// request against SendGrid's documented schema and limits. A request that
// breaks them is answered 400 with a SendGrid-style error body and recorded
// as a violation, so a test fails loudly instead of passing on a request the
// real API would refuse. Answers can be scripted per request.
type fakeSendGrid struct {
	t   *testing.T
	key string
	URL string

	done       chan struct{}
	mu         sync.Mutex
	requests   []sgRecorded
	violations []string
	script     []sgAnswer
	n          int
}

// sgRecorded is one request as received.
type sgRecorded struct {
	Header http.Header
	Body   []byte
	Req    sgWire
}

// sgAnswer scripts one response. Zero Status means 202 with an X-Message-Id.
type sgAnswer struct {
	Status int
	Body   string
	Header map[string]string
	// Hang blocks until the client gives up (or the test ends).
	Hang bool
	// EchoAuth puts the received Authorization header into the error
	// message, as a misbehaving proxy might.
	EchoAuth bool
}

// sgWire is the Mail Send body as documented; unknown fields are an error.
type sgWire struct {
	Personalizations []struct {
		To      []sgWireEmail     `json:"to"`
		CC      []sgWireEmail     `json:"cc"`
		BCC     []sgWireEmail     `json:"bcc"`
		Subject *string           `json:"subject"`
		Headers map[string]string `json:"headers"`
	} `json:"personalizations"`
	From        *sgWireEmail      `json:"from"`
	ReplyTo     *sgWireEmail      `json:"reply_to"`
	ReplyToList []sgWireEmail     `json:"reply_to_list"`
	Subject     *string           `json:"subject"`
	Content     []sgWireContent   `json:"content"`
	Attachments []sgWireAttach    `json:"attachments"`
	Headers     map[string]string `json:"headers"`
}

type sgWireEmail struct {
	Name  string `json:"name"`
	Email string `json:"email"`
}

type sgWireContent struct {
	Type  *string `json:"type"`
	Value *string `json:"value"`
}

type sgWireAttach struct {
	Content     *string `json:"content"`
	Type        *string `json:"type"`
	Filename    *string `json:"filename"`
	Disposition string  `json:"disposition"`
	ContentID   string  `json:"content_id"`
}

func newFakeSendGrid(t *testing.T, key string) *fakeSendGrid {
	t.Helper()
	f := &fakeSendGrid{t: t, key: key}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	srv.Start() // httptest binds 127.0.0.1:0
	done := make(chan struct{})
	t.Cleanup(func() {
		close(done)
		srv.CloseClientConnections()
		srv.Close()
	})
	f.done = done
	f.URL = srv.URL
	return f
}

// Script queues answers for the next requests, in order.
func (f *fakeSendGrid) Script(a ...sgAnswer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script = append(f.script, a...)
}

// Requests returns what was received so far.
func (f *fakeSendGrid) Requests() []sgRecorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]sgRecorded(nil), f.requests...)
}

// AssertValid fails the test for every schema violation seen.
func (f *fakeSendGrid) AssertValid(t *testing.T) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.violations {
		t.Errorf("fake SendGrid: invalid request: %s", v)
	}
}

func (f *fakeSendGrid) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if r.Method != http.MethodPost || r.URL.Path != "/v3/mail/send" {
		sgWriteErrors(w, http.StatusNotFound, "not found", "null")
		return
	}
	if got, want := r.Header.Get("Authorization"), "Bearer "+f.key; got != want {
		sgWriteErrors(w, http.StatusUnauthorized, "authorization required", "null")
		return
	}
	if len(body) > 30<<20 {
		sgWriteErrors(w, http.StatusRequestEntityTooLarge, "content too large", "null")
		return
	}
	var req sgWire
	problems := sgValidate(r, body, &req)

	f.mu.Lock()
	f.n++
	n := f.n
	f.requests = append(f.requests, sgRecorded{Header: r.Header.Clone(), Body: body, Req: req})
	if len(problems) > 0 {
		f.violations = append(f.violations, problems...)
	}
	var a sgAnswer
	if len(f.script) > 0 {
		a, f.script = f.script[0], f.script[1:]
	}
	f.mu.Unlock()

	if len(problems) > 0 {
		sgWriteErrors(w, http.StatusBadRequest, strings.Join(problems, "; "), "null")
		return
	}
	if a.Hang {
		select {
		case <-r.Context().Done():
		case <-f.done:
		case <-time.After(30 * time.Second):
		}
		return
	}
	for k, v := range a.Header {
		w.Header().Set(k, v)
	}
	switch {
	case a.Status == 0:
		w.Header().Set("X-Message-Id", fmt.Sprintf("fake-%d", n))
		w.WriteHeader(http.StatusAccepted)
	case a.EchoAuth:
		sgWriteErrors(w, a.Status, "invalid credentials: "+r.Header.Get("Authorization"), "null")
	default:
		if a.Body != "" {
			w.Header().Set("Content-Type", "application/json")
		}
		w.WriteHeader(a.Status)
		io.WriteString(w, a.Body)
	}
}

func sgWriteErrors(w http.ResponseWriter, status int, msg, field string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"message": msg, "field": field}}})
	w.Write(b)
}

// sendGridReservedHeaders is the documented list (case-insensitive).
var sendGridReservedHeaders = []string{"x-sg-id", "x-sg-eid", "received", "dkim-signature",
	"content-type", "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"}

// sgValidate checks a request against the Mail Send schema and limits.
func sgValidate(r *http.Request, body []byte, req *sgWire) []string {
	var p []string
	bad := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		bad("Content-Type %q is not application/json", ct)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		bad("body does not match the schema: %v", err)
		return p
	}
	email := func(where string, e sgWireEmail) {
		at := strings.LastIndexByte(e.Email, '@')
		if at <= 0 || at == len(e.Email)-1 || strings.ContainsAny(e.Email, " <>,;\"") {
			bad("%s: %q is not a valid email address", where, e.Email)
		}
		for _, c := range e.Email {
			if c >= 0x80 {
				bad("%s: %q: unicode addresses are not supported", where, e.Email)
				break
			}
		}
	}
	if n := len(req.Personalizations); n < 1 || n > 1000 {
		bad("personalizations: must have 1..1000 items, has %d", n)
	}
	total := 0
	seen := map[string]bool{}
	allSubjects := len(req.Personalizations) > 0
	for i, ps := range req.Personalizations {
		if len(ps.To) == 0 {
			bad("personalizations.%d.to: The to parameter is required for all personalization objects.", i)
		}
		if ps.Subject == nil || *ps.Subject == "" {
			allSubjects = false
		}
		for _, list := range []struct {
			name string
			l    []sgWireEmail
		}{{"to", ps.To}, {"cc", ps.CC}, {"bcc", ps.BCC}} {
			total += len(list.l)
			for j, e := range list.l {
				where := fmt.Sprintf("personalizations.%d.%s.%d", i, list.name, j)
				email(where, e)
				if strings.ContainsAny(e.Name, ";,") {
					bad("%s: name %q must not contain ';' or ','", where, e.Name)
				}
				k := strings.ToLower(e.Email)
				if seen[k] {
					bad("%s: Each unique email address in the personalizations array should only be included once (%s)", where, e.Email)
				}
				seen[k] = true
			}
		}
		sgCheckHeaders(fmt.Sprintf("personalizations.%d.headers", i), ps.Headers, bad)
	}
	if total > 1000 {
		bad("personalizations: There is a limit of 1000 total recipients (to + cc + bcc) per request; got %d", total)
	}
	if req.From == nil || req.From.Email == "" {
		bad("from.email: required")
	} else {
		email("from", *req.From)
	}
	if (req.Subject == nil || *req.Subject == "") && !allSubjects {
		bad("subject: The subject is required.")
	}
	if req.ReplyTo != nil && req.ReplyToList != nil {
		bad("reply_to: use either reply_to or reply_to_list, not both")
	}
	if req.ReplyTo != nil {
		email("reply_to", *req.ReplyTo)
	}
	rt := map[string]bool{}
	for i, e := range req.ReplyToList {
		email(fmt.Sprintf("reply_to_list.%d", i), e)
		if rt[strings.ToLower(e.Email)] {
			bad("reply_to_list: items must be unique")
		}
		rt[strings.ToLower(e.Email)] = true
	}
	if len(req.Content) == 0 {
		bad("content: at least one content item is required")
	}
	for i, c := range req.Content {
		if c.Type == nil || *c.Type == "" {
			bad("content.%d.type: required, at least one character", i)
			continue
		}
		if c.Value == nil || *c.Value == "" {
			bad("content.%d.value: The content value must be a string at least one character in length.", i)
		}
		switch *c.Type {
		case "text/plain":
			if i != 0 {
				bad("content: text/plain must be first")
			}
		case "text/html":
			if i != 0 && (i != 1 || *req.Content[0].Type != "text/plain") {
				bad("content: text/html must come first or right after text/plain")
			}
		}
	}
	for i, a := range req.Attachments {
		if a.Content == nil || *a.Content == "" {
			bad("attachments.%d.content: required", i)
		} else if _, err := base64.StdEncoding.Strict().DecodeString(*a.Content); err != nil {
			bad("attachments.%d.content: not valid base64: %v", i, err)
		}
		if a.Filename == nil || *a.Filename == "" {
			bad("attachments.%d.filename: required", i)
		}
		if a.Type != nil && *a.Type == "" {
			bad("attachments.%d.type: at least one character", i)
		}
		switch a.Disposition {
		case "", "attachment":
		case "inline":
			if a.ContentID == "" {
				bad("attachments.%d.content_id: required for inline disposition", i)
			}
		default:
			bad("attachments.%d.disposition: %q is not inline or attachment", i, a.Disposition)
		}
		if strings.ContainsAny(a.ContentID, "<>") {
			bad("attachments.%d.content_id: %q must not have angle brackets", i, a.ContentID)
		}
	}
	sgCheckHeaders("headers", req.Headers, bad)
	return p
}

func sgCheckHeaders(where string, h map[string]string, bad func(string, ...any)) {
	for k := range h {
		for _, r := range sendGridReservedHeaders {
			if strings.EqualFold(k, r) {
				bad("%s: %s is a reserved header and cannot be set", where, k)
			}
		}
	}
}
