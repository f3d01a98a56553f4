package upstreams

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

// Shared by ses_test.go, mailgun_test.go and smtp2go_test.go.

// apiTestMessage builds a CRLF message with the given header recipients.
func apiTestMessage(from string, headerTo []string, envelope []string) *Message {
	data := "Received: from app (localhost [127.0.0.1]) by relaycar.local; Sat, 22 Nov 2026 10:00:00 +0000\r\n" +
		"From: \"Alice Example\" <" + from + ">\r\n" +
		"To: " + strings.Join(headerTo, ", ") + "\r\n" +
		"Subject: relaycar adapter test\r\n" +
		"Message-ID: <test-1@relaycar.local>\r\n" +
		"Date: Sat, 22 Nov 2026 10:00:00 +0000\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"\r\n" +
		"Hello from the relaycar adapter test.\r\n"
	return &Message{ID: "spool-1", From: from, To: envelope, Data: []byte(data), MessageID: "<test-1@relaycar.local>"}
}

// apiRcpts returns n distinct recipient addresses.
func apiRcpts(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("rcpt%04d@example.net", i)
	}
	return out
}

// apiSweepWant is the class a provider without richer error codes must give
// an HTTP status: the table of DESIGN.md/STYLE.md §2, written out rather than
// calling ClassifyHTTP so that a change to either is caught.
func apiSweepWant(status int) Class {
	switch {
	case status >= 200 && status < 300:
		return Ambiguous // a 2xx the adapter cannot read as "accepted, id X"
	case status == 401, status == 403:
		return ProviderFault
	case status == 408, status == 429:
		return Transient
	case status == 400, status == 413, status == 422:
		return Rejected
	case status >= 500:
		return Transient
	case status >= 400:
		return ProviderFault // 402, 404, 451, ...: account or configuration
	}
	return Transient // 3xx without Location: not an answer from the API
}

// apiClassOf asserts err is an *Error and returns it.
func apiClassOf(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *upstreams.Error", err, err)
	}
	return e
}

// apiLeakTest runs the secret-leak checks for one adapter: a fake that
// fails (echoing the key in its body, as some APIs do) and one that hangs
// past the timeout. newU builds the adapter for a fake URL with the logger;
// failReply is the provider's failure answer (containing the key).
func apiLeakTest(t *testing.T, secrets []string, failReply fakes.Reply, newU func(url string, log *slog.Logger, timeout time.Duration) Upstream) {
	t.Run("fails", func(t *testing.T) {
		t.Parallel()
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return failReply })
		log, logs := fakes.NewLogger()
		u := newU(f.URL, log, 5*time.Second)
		_, err := u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
		if err == nil {
			t.Fatal("Send succeeded against a failing fake")
		}
		log.Warn("delivery attempt failed", slog.Any("err", err))
		log.Error("delivery attempt failed", "err", err, "text", err.Error())
		fakes.AssertNoSecret(t, err, logs, secrets...)
		if len(f.Requests()) == 0 {
			t.Fatal("fake saw no request")
		}
	})
	t.Run("hangs", func(t *testing.T) {
		t.Parallel()
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.Reply{Hang: true} })
		log, logs := fakes.NewLogger()
		u := newU(f.URL, log, 300*time.Millisecond)
		start := time.Now()
		_, err := u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
		if err == nil {
			t.Fatal("Send succeeded against a hanging fake")
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("Send took %v; the 300ms timeout was not applied", d)
		}
		// The whole request was written before the hang: it may have been taken.
		if c := ClassOf(err); c != Ambiguous {
			t.Errorf("class = %v, want ambiguous (request sent, no answer): %v", c, err)
		}
		log.Warn("delivery attempt failed", slog.Any("err", err))
		log.Error("delivery attempt failed", "err", err, "text", err.Error())
		fakes.AssertNoSecret(t, err, logs, secrets...)
	})
}

// apiDropAfterRequest starts a server on 127.0.0.1 that reads each whole
// request and closes the connection without answering, and returns its URL.
func apiDropAfterRequest(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err == nil {
					io.Copy(io.Discard, req.Body)
				}
			}()
		}
	}()
	return "http://" + l.Addr().String()
}

// apiRefusedURL returns a loopback URL where nothing listens.
func apiRefusedURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr
}

func TestAPIAdapters_RejectBadEndpoint(t *testing.T) {
	t.Parallel()
	const secretish = "https//user:hunter2@proxy"
	for _, typ := range []string{"ses", "mailgun", "smtp2go"} {
		c := Config{Name: "x", Type: typ, Region: "us-east-1", Domain: "mg.example.com", APIKey: "k", Endpoint: secretish}
		if typ == "mailgun" {
			c.Region = "us"
		}
		_, err := New(c, Deps{})
		if err == nil {
			t.Errorf("%s: endpoint %q accepted", typ, secretish)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: error echoes the endpoint: %v", typ, err)
		}
	}
}

func TestAPIConfig_Validate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		c    Config
		want string // "" = valid
	}{
		{Config{Name: "s", Type: "ses", Region: "us-east-1"}, ""},
		{Config{Name: "s", Type: "ses", Region: "us-gov-west-1", Endpoint: "http://127.0.0.1:8005"}, ""},
		{Config{Name: "s", Type: "ses", Region: "US East"}, `upstreams[0].region: "US East": not an AWS region name (like us-east-1)`},
		{Config{Name: "s", Type: "ses", Region: "eu-west-1", Endpoint: "localhost:8005"}, "upstreams[0].endpoint: must be an absolute http:// or https:// URL"},
		{Config{Name: "m", Type: "mailgun", Region: "eu", Domain: "mg.example.com", APIKey: "k", Endpoint: "https://api.eu.mailgun.net/v3"},
			"upstreams[0].endpoint: give the Mailgun API base without the version (no /v3)"},
		{Config{Name: "g", Type: "smtp2go", APIKey: "k", Endpoint: "https://eu-api.smtp2go.com/v3"}, ""},
	} {
		errs := tc.c.Validate("upstreams[0]")
		var got []string
		for _, e := range errs {
			got = append(got, e.Error())
		}
		if tc.want == "" && len(got) != 0 || tc.want != "" && !slices.Contains(got, tc.want) {
			t.Errorf("%+v: problems %q, want %q", tc.c, got, tc.want)
		}
	}
}

// An operation that made an earlier request (an SDK credential fetch) and
// then failed to connect for the provider call sent nothing to the provider:
// that is transient, not ambiguous.
func TestAPITrace_ProgressIsPerRequest(t *testing.T) {
	ok := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.Reply{Status: 200, Body: "{}"} })
	ctx, p := apiTrace(context.Background())
	resp, err := http.DefaultClient.Do(mustRequest(t, ctx, ok.URL))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if !p.wrote.Load() {
		t.Fatal("first request not recorded")
	}
	if _, err := http.DefaultClient.Do(mustRequest(t, ctx, apiRefusedURL(t))); err == nil {
		t.Fatal("refused URL answered")
	}
	if p.wrote.Load() {
		t.Error("progress of the earlier request leaked into the failed one")
	}
}

func mustRequest(t *testing.T, ctx context.Context, url string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// Transport failures of the raw-MIME HTTP adapters, one table: nothing
// listening means the request never left (fail over safely); a connection
// dropped after the whole request, or a 200 that does not parse, means the
// provider may have the message.
func TestAPI_TransportErrors(t *testing.T) {
	t.Parallel()
	adapters := map[string]func(t *testing.T, endpoint string) Upstream{
		"ses":     func(t *testing.T, e string) Upstream { return newTestSES(t, e) },
		"mailgun": func(t *testing.T, e string) Upstream { return newTestMailgun(t, e) },
		"smtp2go": func(t *testing.T, e string) Upstream { return newTestSMTP2GO(t, e) },
	}
	garbage200 := func(t *testing.T) string {
		return fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.Reply{Status: 200, Body: "<html>ok</html>"} }).URL
	}
	for name, newUp := range adapters {
		for _, tc := range []struct {
			what     string
			endpoint func(*testing.T) string
			want     Class
		}{
			{"connection refused", apiRefusedURL, Transient},
			{"dropped after the request", apiDropAfterRequest, Ambiguous},
			{"unparseable 200", garbage200, Ambiguous},
		} {
			t.Run(name+"/"+tc.what, func(t *testing.T) {
				t.Parallel()
				msg := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
				if _, err := newUp(t, tc.endpoint(t)).Send(context.Background(), msg); ClassOf(err) != tc.want {
					t.Errorf("got %v, want %v", err, tc.want)
				}
			})
		}
	}
}
