// Package fakes holds test doubles shared by the provider adapter tests: a
// recording HTTP server bound to 127.0.0.1 that answers from a script, and
// a slog capture for secret-leak assertions. It is imported by tests only.
package fakes

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// Request is one request the fake received, body included.
type Request struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
}

// Reply is the fake's answer to one request.
type Reply struct {
	Status int               // 0 means 200
	Header map[string]string // e.g. Content-Type, x-amzn-ErrorType
	Body   string
	// Hang makes the handler block until the client gives up (or the test
	// ends) without answering: the "request sent, no reply" case.
	Hang bool
}

// JSON is a Reply with a JSON body and Content-Type.
func JSON(status int, body string) Reply {
	return Reply{Status: status, Header: map[string]string{"Content-Type": "application/json"}, Body: body}
}

// HTTP is a recording fake API server.
type HTTP struct {
	URL string

	srv     *httptest.Server
	respond func(n int, r Request) Reply
	stop    chan struct{}

	mu   sync.Mutex
	reqs []Request
}

// NewHTTP starts a fake on 127.0.0.1 that records every request and answers
// with respond(n, req), n counting from 0. It is closed when the test ends.
func NewHTTP(t testing.TB, respond func(n int, r Request) Reply) *HTTP {
	t.Helper()
	h := &HTTP{respond: respond, stop: make(chan struct{})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fake listen: %v", err)
	}
	h.srv = httptest.NewUnstartedServer(http.HandlerFunc(h.serve))
	h.srv.Listener.Close()
	h.srv.Listener = l
	h.srv.Start()
	h.URL = h.srv.URL
	t.Cleanup(func() {
		close(h.stop) // release hanging handlers first, or Close waits for them
		h.srv.Close()
	})
	return h
}

func (h *HTTP) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	req := Request{Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), Body: body}
	h.mu.Lock()
	n := len(h.reqs)
	h.reqs = append(h.reqs, req)
	h.mu.Unlock()

	rep := h.respond(n, req)
	if rep.Hang {
		select {
		case <-r.Context().Done():
		case <-h.stop:
		}
		return
	}
	for k, v := range rep.Header {
		w.Header().Set(k, v)
	}
	status := rep.Status
	if status == 0 {
		status = http.StatusOK
	}
	w.WriteHeader(status)
	// Statuses without a body (204, 304) make Write fail; that is fine.
	_, _ = io.WriteString(w, rep.Body)
}

// Requests returns a copy of what the fake received so far.
func (h *HTTP) Requests() []Request {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Request(nil), h.reqs...)
}

// Logs is a concurrency-safe buffer behind a slog.Logger.
type Logs struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// NewLogger returns a debug-level text logger writing into the returned Logs.
func NewLogger() (*slog.Logger, *Logs) {
	l := &Logs{}
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug})), l
}

// Write implements io.Writer.
func (l *Logs) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything logged so far.
func (l *Logs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// AssertNoSecret fails the test when any secret occurs in err's text or in
// the captured logs.
func AssertNoSecret(t testing.TB, err error, logs *Logs, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s == "" {
			continue
		}
		if err != nil && strings.Contains(err.Error(), s) {
			t.Errorf("secret %q leaked into err.Error(): %s", s, err.Error())
		}
		if logs != nil && strings.Contains(logs.String(), s) {
			t.Errorf("secret %q leaked into the log:\n%s", s, logs.String())
		}
	}
}

// FormPart is one part of a multipart/form-data request body.
type FormPart struct {
	Name, FileName string
	Data           []byte
}

// MultipartForm decodes a recorded multipart/form-data request (Mailgun's
// messages.mime) into its parts, in order.
func MultipartForm(r Request) ([]FormPart, error) {
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" {
		return nil, fmt.Errorf("Content-Type = %q, want multipart/form-data", r.Header.Get("Content-Type"))
	}
	var parts []FormPart
	mr := multipart.NewReader(bytes.NewReader(r.Body), params["boundary"])
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return parts, nil
		}
		if err != nil {
			return nil, fmt.Errorf("multipart: %w", err)
		}
		b, err := io.ReadAll(p)
		if err != nil {
			return nil, fmt.Errorf("multipart part %q: %w", p.FormName(), err)
		}
		parts = append(parts, FormPart{Name: p.FormName(), FileName: p.FileName(), Data: b})
	}
}
