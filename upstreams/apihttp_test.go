package upstreams

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
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
	return &Message{ID: "spool-1", From: from, To: envelope, Body: BytesBody([]byte(data)), MessageID: "<test-1@relaycar.local>"}
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
// an HTTP status: the api column of the literal oracle in errors_test.go
// (the table of DESIGN.md/STYLE.md §2), not a call to classifyHTTP, so that
// a change to either is caught.
func apiSweepWant(status int) Class {
	_, api := oracle(status)
	return api
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
func apiRefusedURL(t *testing.T) string { return "http://" + closedPort(t) }

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
		{Config{Name: "m", Type: "mailgun", Region: "eu", Domain: "mg.example.com", APIKey: mailgunTestKey, Endpoint: "https://api.eu.mailgun.net/v3"},
			"upstreams[0].endpoint: give the Mailgun API base without the version (no /v3)"},
		{Config{Name: "g", Type: "smtp2go", APIKey: smtp2goTestKey, Endpoint: "https://eu-api.smtp2go.com/v3"}, ""},
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
		"ses":      func(t *testing.T, e string) Upstream { return newTestSES(t, e) },
		"mailgun":  func(t *testing.T, e string) Upstream { return newTestMailgun(t, e) },
		"smtp2go":  func(t *testing.T, e string) Upstream { return newTestSMTP2GO(t, e) },
		"sendgrid": func(t *testing.T, e string) Upstream { return newTestSendGrid(t, e, sgTestKey, 5*time.Second, nil) },
	}
	garbage200 := func(t *testing.T) string {
		return fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.Reply{Status: 200, Body: "<html>ok</html>"} }).URL
	}
	// A body past the bound: an error, never a truncated body that parses.
	huge200 := func(t *testing.T) string {
		return apiEndlessServer(t, apiEndless{status: 200, prefix: `{"MessageId":"x","id":"x","data":{"email_id":"x"}}`, filler: ' '}).url
	}
	huge500 := func(t *testing.T) string { return apiEndlessServer(t, apiEndless{status: 500}).url }
	for name, newUp := range adapters {
		for _, tc := range []struct {
			what     string
			endpoint func(*testing.T) string
			want     Class
		}{
			{"connection refused", apiRefusedURL, Transient},
			{"dropped after the request", apiDropAfterRequest, Ambiguous},
			{"unparseable 200", garbage200, Ambiguous},
			{"huge 200", huge200, Ambiguous},
			// The status is the answer even when its body cannot be read.
			{"huge 500", huge500, Transient},
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

// apiEndless scripts a provider (or a broken proxy in front of it) that
// answers with a body that never ends.
type apiEndless struct {
	status int
	header map[string]string
	prefix string // written first, e.g. the start of a JSON answer
	filler byte   // then repeated; 'a' if zero
	// every, when set, trickles one byte per interval instead of streaming.
	every time.Duration
}

// apiEndlessFake is a running endless server.
type apiEndlessFake struct {
	url     string
	written atomic.Int64
}

// apiEndlessMax bounds what a test server writes, so a client that reads
// everything (the bug) still finishes.
const apiEndlessMax = 64 << 20

// apiEndlessServer starts a server on 127.0.0.1 that reads each request and
// answers as e says until the client goes away or apiEndlessMax is written.
func apiEndlessServer(t *testing.T, e apiEndless) *apiEndlessFake {
	t.Helper()
	f := &apiEndlessFake{}
	filler := e.filler
	if filler == 0 {
		filler = 'a'
	}
	chunk := bytes.Repeat([]byte{filler}, 32<<10)
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		for k, v := range e.header {
			w.Header().Set(k, v)
		}
		w.WriteHeader(e.status)
		n, _ := io.WriteString(w, e.prefix)
		f.written.Add(int64(n))
		fl, _ := w.(http.Flusher)
		for f.written.Load() < apiEndlessMax && r.Context().Err() == nil {
			b := chunk
			if e.every > 0 {
				select {
				case <-time.After(e.every):
				case <-r.Context().Done():
					return
				case <-done:
					return
				}
				b = chunk[:1]
			}
			n, err := w.Write(b)
			f.written.Add(int64(n))
			if err != nil {
				return
			}
			if fl != nil && e.every > 0 {
				fl.Flush()
			}
		}
	}))
	t.Cleanup(func() {
		close(done)
		srv.Close()
	})
	f.url = srv.URL
	return f
}

// Models the hardening issue's report: an HTTP 2xx with an endless body
// drove the relay to 3.9 GB (SendGrid, Mailgun) and 2.1 GB (SES), and
// SendGrid then counted the message delivered. Not parallel: it measures
// the process's allocations.
func TestAPI_EndlessResponseBodyIsBounded(t *testing.T) {
	const timeout = 5 * time.Second
	type build func(t *testing.T, url string, timeout time.Duration) Upstream
	ses := func(t *testing.T, u string, d time.Duration) Upstream {
		return newTestSES(t, u, func(c *Config) { c.Timeout = d })
	}
	mg := func(t *testing.T, u string, d time.Duration) Upstream {
		return newTestMailgun(t, u, func(c *Config) { c.Timeout = d })
	}
	s2g := func(t *testing.T, u string, d time.Duration) Upstream {
		g := newTestSMTP2GO(t, u)
		g.timeout, g.client.Timeout = d, d
		return g
	}
	sg := func(t *testing.T, u string, d time.Duration) Upstream {
		return newTestSendGrid(t, u, sgTestKey, d, nil)
	}
	for _, tc := range []struct {
		name   string
		up     build
		answer apiEndless
		want   Class // ignored when wantID is set
		wantID string
	}{
		{"ses 200", ses, apiEndless{status: 200, prefix: `{"MessageId":"`}, Ambiguous, ""},
		{"mailgun 200", mg, apiEndless{status: 200, prefix: `{"message":"Queued. Thank you.","id":"`}, Ambiguous, ""},
		{"smtp2go 200", s2g, apiEndless{status: 200, prefix: `{"data":{"succeeded":1,"failed":0,"email_id":"`}, Ambiguous, ""},
		{"sendgrid 200 without id", sg, apiEndless{status: 200}, Ambiguous, ""},
		// SendGrid's whole answer is the status and the header: the body
		// is not read at all.
		{"sendgrid 202 with id", sg, apiEndless{status: 202, header: map[string]string{"X-Message-Id": "sg-endless-1"}}, 0, "sg-endless-1"},
		{"ses 500", ses, apiEndless{status: 500, header: map[string]string{"Content-Type": "application/json"}, prefix: `{"message":"`}, Transient, ""},
		{"mailgun 400", mg, apiEndless{status: 400, prefix: `{"message":"`}, Rejected, ""},
		{"smtp2go 503", s2g, apiEndless{status: 503}, Transient, ""},
		{"sendgrid 502", sg, apiEndless{status: 502}, Transient, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := apiEndlessServer(t, tc.answer)
			u := tc.up(t, f.url, timeout)
			msg := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
			if _, ok := u.(*sendGridUpstream); ok {
				msg = sgMessage("alice@example.com", []string{"bob@example.net"}, "From: alice@example.com\nTo: bob@example.net\nSubject: s\n\nbody\n")
			}
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			rc, err := u.Send(context.Background(), msg)
			id := rc.ProviderID
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("took %v, allocated %d KiB, server wrote %d KiB: %v", took, alloc>>10, f.written.Load()>>10, err)
			if tc.wantID != "" {
				if err != nil || id != tc.wantID {
					t.Errorf("id %q, err %v; want delivered as %q", id, err, tc.wantID)
				}
			} else {
				if e := apiClassOf(t, err); e.Class != tc.want {
					t.Errorf("class = %v, want %v (%v)", e.Class, tc.want, err)
				}
				if id != "" {
					t.Errorf("id = %q with an error; want none", id)
				}
			}
			if took > timeout/2 {
				t.Errorf("took %v; the body must not be read until the %v timeout", took, timeout)
			}
			if alloc > 16<<20 {
				t.Errorf("allocated %d MiB for one send; response bodies must be bounded", alloc>>20)
			}
		})
	}
}

// A body that trickles forever never reaches the size bound: the upstream's
// timeout must end the exchange, reading the body included.
func TestAPI_TricklingResponseBodyEndsAtTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 400 * time.Millisecond
	trickle := apiEndless{status: 200, prefix: `{"MessageId":"x","id":"x","data":{"email_id":"x"`, filler: ' ', every: 20 * time.Millisecond}
	for name, up := range map[string]func(t *testing.T, url string) Upstream{
		"ses": func(t *testing.T, u string) Upstream {
			return newTestSES(t, u, func(c *Config) { c.Timeout = timeout })
		},
		"mailgun": func(t *testing.T, u string) Upstream {
			return newTestMailgun(t, u, func(c *Config) { c.Timeout = timeout })
		},
		"smtp2go": func(t *testing.T, u string) Upstream {
			g := newTestSMTP2GO(t, u)
			g.timeout, g.client.Timeout = timeout, timeout
			return g
		},
		"sendgrid": func(t *testing.T, u string) Upstream { return newTestSendGrid(t, u, sgTestKey, timeout, nil) },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := apiEndlessServer(t, trickle)
			msg := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
			start := time.Now()
			rc, err := up(t, f.url).Send(context.Background(), msg)
			id := rc.ProviderID
			if took := time.Since(start); took > timeout+time.Second {
				t.Errorf("took %v with a %v timeout", took, timeout)
			}
			if ClassOf(err) != Ambiguous || id != "" {
				t.Errorf("id %q, err %v; want ambiguous (a 2xx whose body never ends)", id, err)
			}
		})
	}
}

func TestAPILimitedBody(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		size    int
		wantErr error
	}{{0, nil}, {100, nil}, {apiMaxResponseBytes, nil}, {apiMaxResponseBytes + 1, errResponseTooLarge}, {4 * apiMaxResponseBytes, errResponseTooLarge}} {
		b := &apiLimitedBody{rc: io.NopCloser(bytes.NewReader(make([]byte, tc.size))), left: apiMaxResponseBytes}
		got, err := io.ReadAll(b)
		if !errors.Is(err, tc.wantErr) || err == nil && len(got) != tc.size || len(got) > apiMaxResponseBytes {
			t.Errorf("%d bytes: read %d, err %v; want err %v", tc.size, len(got), err, tc.wantErr)
		}
	}
}

// Redaction replaces credentials where they sit, not every occurrence of
// a short string: a one-character secret "s" used to turn every "s" of an
// error into "<secret>".
func TestAPIRedact(t *testing.T) {
	t.Parallel()
	const realKey = "api-5E1F2A3B4C5D6E7F8091A2B3C4D5E6F7" // the SMTP2GO form
	for _, tc := range []struct {
		name    string
		in      string
		secrets []Secret
		want    string
	}{
		{"short secret leaves text alone", "HTTP 500: service unavailable, please retry", []Secret{"s"},
			"HTTP 500: service unavailable, please retry"},
		{"short secret in a key field", `{"api_key": "s", "error": "invalid"}`, []Secret{"s"},
			`{"api_key": "<secret>", "error": "invalid"}`},
		{"realistic key in free text", "Invalid API key " + realKey + " for this account", []Secret{realKey},
			"Invalid API key <secret> for this account"},
		{"echoed JSON field, any value", `{"request_id":"r1","api_key":"api-0000OTHERKEY","mime_email":"..."}`, nil,
			`{"request_id":"r1","api_key":"<secret>","mime_email":"..."}`},
		{"authorization header", "proxy saw Authorization: Bearer SG.abc.def", nil, "proxy saw Authorization: <secret>"},
		{"sigv4 authorization", `"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261122/us-east-1/ses/aws4_request, Signature=abc"`, nil,
			`"Authorization": "<secret>"`},
		{"bare bearer token", "invalid credentials: Bearer SG.LEAKCHECK-7f3a9c.Zx81Qw", nil, "invalid credentials: Bearer <secret>"},
		{"bearer in prose", "bearer authentication is required", nil, "bearer authentication is required"},
		{"basic in prose", "535 5.7.139 basic authentication is disabled", nil, "535 5.7.139 basic authentication is disabled"},
		{"basic credentials", "got Basic YXBpOmtleS1tZy0zZjlhN2MxZTViMmQ0MDY4", nil, "got Basic <secret>"},
		{"api key header", "X-Smtp2go-Api-Key: api-123 was refused", nil, "X-Smtp2go-Api-Key: <secret> was refused"},
		{"query string", "GET https://api.example.com/v3/send?api_key=abc123&to=b@example.net failed", nil,
			"GET https://api.example.com/v3/send?api_key=<secret>&to=b@example.net failed"},
		{"url userinfo", `Post "https://user:hunter2@proxy.example:8080/v3/mime": EOF`, nil,
			`Post "https://<secret>@proxy.example:8080/v3/mime": EOF`},
		{"address is not userinfo", "mailto:bob@example.net and https://example.com/a@b", nil,
			"mailto:bob@example.net and https://example.com/a@b"},
	} {
		if got := apiRedact(tc.in, tc.secrets...); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", tc.name, got, tc.want)
		}
	}
}

// An adapter built with a one-character key (Validate refuses it, tests
// and embedders may not) keeps the provider's reason readable, and a
// realistic key echoed back in the error body still never reaches it.
func TestAPI_ShortSecretDoesNotGarbleReasons(t *testing.T) {
	t.Parallel()
	const reason = "sender address is not a verified sender"
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
		return fakes.JSON(400, `{"data":{"error":"`+reason+`","error_code":"E_ApiResponseCodes.SENDER_NOT_VERIFIED","api_key":"s"}}`)
	})
	u, err := newSMTP2GO(Config{Name: "smtp2go-short", Type: "smtp2go", APIKey: "s", Endpoint: f.URL, Timeout: 5 * time.Second}, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
	if e := apiClassOf(t, err); !strings.Contains(e.Reason, reason) || strings.Contains(e.Reason, "<secret>") {
		t.Errorf("reason %q: want the provider's words, unredacted", e.Reason)
	}

	// The request echoed back with a realistic key, in a field and in text.
	echo := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
		return fakes.JSON(401, `{"data":{"error":"Invalid API key `+smtp2goTestKey+`","error_code":"E_ApiResponseCodes.API_KEY_INVALID","request":{"api_key":"`+smtp2goTestKey+`"}}}`)
	})
	_, err = newTestSMTP2GO(t, echo.URL).Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
	if err == nil || strings.Contains(err.Error(), smtp2goTestKey) || strings.Contains(err.Error(), "5E1F2A3B") {
		t.Errorf("key leaked or no error: %v", err)
	}
}
