package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	neturl "net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mailgun/mailgun-go/v5"
	"github.com/relaycar/relaycar/internal/fakes"
)

const (
	mailgunTestKey    = "key-mg-3f9a7c1e5b2d4068a1c3e5f7"
	mailgunTestDomain = "mg.example.com"
)

func newTestMailgun(t *testing.T, endpoint string, mod ...func(*Config)) *mailgunUpstream {
	t.Helper()
	c := Config{Name: "mailgun-test", Type: "mailgun", Region: "us", Domain: mailgunTestDomain,
		APIKey: mailgunTestKey, Endpoint: endpoint, Timeout: 5 * time.Second}
	for _, f := range mod {
		f(&c)
	}
	u, err := newMailgun(c, Deps{})
	if err != nil {
		t.Fatalf("newMailgun: %v", err)
	}
	return u
}

func mailgunOK(id string) fakes.Reply {
	return fakes.JSON(200, `{"id":"`+id+`","message":"Queued. Thank you."}`)
}

// mailgunForm is a decoded messages.mime request.
type mailgunForm struct {
	to       []string
	message  []byte
	filename string
	other    []string
}

// decodeMailgunRequest validates a request against the documented format
// (POST /v3/{domain}/messages.mime, basic auth api:key, multipart/form-data
// with repeated `to` fields and a file part `message`) and decodes it.
func decodeMailgunRequest(t *testing.T, r fakes.Request) mailgunForm {
	t.Helper()
	if r.Method != http.MethodPost || r.Path != "/v3/"+mailgunTestDomain+"/messages.mime" {
		t.Errorf("request = %s %s, want POST /v3/%s/messages.mime", r.Method, r.Path, mailgunTestDomain)
	}
	req := &http.Request{Header: r.Header}
	user, pass, ok := req.BasicAuth()
	if !ok || user != "api" || pass != mailgunTestKey {
		t.Errorf("basic auth = %q/%q (ok=%v), want api/<key>", user, pass, ok)
	}
	parts, err := fakes.MultipartForm(r)
	if err != nil {
		t.Fatal(err)
	}
	var f mailgunForm
	for _, p := range parts {
		switch p.Name {
		case "to":
			f.to = append(f.to, string(p.Data))
		case "message":
			if f.message != nil {
				t.Error("more than one message part")
			}
			f.message, f.filename = p.Data, p.FileName
		default:
			f.other = append(f.other, p.Name)
		}
	}
	if f.message == nil || f.filename == "" {
		t.Errorf("no file part `message` (filename %q)", f.filename)
	}
	return f
}

func TestMailgun_Request(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return mailgunOK("<20261122.1@mg.example.com>") })
	m := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net", "hidden@example.org"})
	orig := bodyOf(m)
	rc, err := newTestMailgun(t, f.URL).Send(context.Background(), m)
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if id != "<20261122.1@mg.example.com>" {
		t.Errorf("id = %q", id)
	}
	reqs := f.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	form := decodeMailgunRequest(t, reqs[0])
	if !slices.Equal(form.to, m.To) {
		t.Errorf("to fields = %q, want the envelope %q", form.to, m.To)
	}
	if !bytes.Equal(form.message, orig) {
		t.Errorf("message part =\n%q\nwant the input bytes\n%q", form.message, orig)
	}
	if len(form.other) != 0 {
		t.Errorf("unexpected form fields %q", form.other)
	}
	if !bytes.Equal(bodyOf(m), orig) {
		t.Error("Send modified m.Data")
	}
}

func TestMailgun_RegionBase(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ region, endpoint, want string }{
		{"us", "", mailgun.APIBase},
		{"eu", "", mailgun.APIBaseEU},
		{"eu", "http://127.0.0.1:9/", "http://127.0.0.1:9"},
	} {
		u := newTestMailgun(t, tc.endpoint, func(c *Config) { c.Region = tc.region })
		if got := u.client.APIBase(); got != tc.want {
			t.Errorf("region %s endpoint %q: API base %q, want %q", tc.region, tc.endpoint, got, tc.want)
		}
	}
	if _, err := newMailgun(Config{Name: "m", Domain: "d", APIKey: "k", Endpoint: "https://api.mailgun.net/v3"}, Deps{}); err == nil {
		t.Error("an endpoint with /v3 was accepted; the SDK would build /v3/v3 URLs")
	}
}

func TestMailgun_ChunksOf1000(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(n int, _ fakes.Request) fakes.Reply { return mailgunOK(fmt.Sprintf("<mg-%d>", n)) })
	rcpts := apiRcpts(2500)
	rc, err := newTestMailgun(t, f.URL).Send(context.Background(), apiTestMessage("alice@example.com", rcpts[:1], rcpts))
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if id != "<mg-0>" {
		t.Errorf("id = %q, want the first call's", id)
	}
	reqs := f.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d calls for 2500 recipients, want 3", len(reqs))
	}
	for i, want := range [][]string{rcpts[:1000], rcpts[1000:2000], rcpts[2000:]} {
		if got := decodeMailgunRequest(t, reqs[i]).to; !slices.Equal(got, want) {
			t.Errorf("call %d: %d recipients, want %d", i, len(got), len(want))
		}
	}
}

// Models Mailgun rate-limiting the domain in the middle of a large send.
func TestMailgun_LaterChunkFails(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(n int, _ fakes.Request) fakes.Reply {
		if n == 0 {
			return mailgunOK("<mg-first>")
		}
		return fakes.Reply{Status: 429, Header: map[string]string{"X-RateLimit-Reset": "1795000000"}, Body: `{"message":"rate limited"}`}
	})
	rcpts := apiRcpts(1500)
	rc, err := newTestMailgun(t, f.URL).Send(context.Background(), apiTestMessage("alice@example.com", rcpts[:1], rcpts))
	e := refusedErr(t, rc, err)
	if e.Class != Transient || e.Code != "429" {
		t.Errorf("class/code = %v/%s, want transient/429", e.Class, e.Code)
	}
	if !strings.Contains(e.Reason, "rate limit resets at") {
		t.Errorf("reason %q should say when the rate limit resets", e.Reason)
	}
	if !slices.Equal(rc.RefusedRcpts(), rcpts[1000:]) || rc.ProviderID != "<mg-first>" {
		t.Errorf("Refused = %d, ProviderID = %q; want the 500 undelivered and <mg-first>", len(rc.Refused), rc.ProviderID)
	}
}

func TestMailgun_StatusSweep(t *testing.T) {
	t.Parallel()
	for status := 200; status <= 599; status++ {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
				if status < 300 {
					r := mailgunOK("<mg-sweep>")
					r.Status = status
					return r
				}
				return fakes.JSON(status, `{"message":"scripted failure"}`)
			})
			rc, err := newTestMailgun(t, f.URL).Send(context.Background(),
				apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			id := rc.ProviderID
			// The SDK accepts 200, 202 and 204; 204 has no body to carry an id.
			if status == 200 || status == 202 {
				if err != nil || id != "<mg-sweep>" {
					t.Errorf("id %q, err %v: want success", id, err)
				}
				return
			}
			e := apiClassOf(t, err)
			if want := apiSweepWant(status); e.Class != want {
				t.Errorf("class = %v, want %v (%v)", e.Class, want, err)
			}
			if status >= 300 && e.Code != strconv.Itoa(status) {
				t.Errorf("code = %q, want %d", e.Code, status)
			}
		})
	}
}

func TestMailgun_DocumentedErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status int
		body   string
		want   Class
	}{
		{400, `{"message":"to parameter is not a valid address. please check documentation"}`, Rejected},
		{401, `Forbidden`, ProviderFault},
		{403, `{"message":"Domain mg.example.com is not allowed to send: Free accounts are for test purposes only."}`, ProviderFault},
		{404, `{"message":"Domain not found: mg.example.com"}`, ProviderFault},
		{413, `<html><body>413 Request Entity Too Large</body></html>`, Unsupported},
		{429, `{"message":"Too many requests"}`, Transient},
		{500, `{"message":"Internal server error"}`, Transient},
	} {
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.Reply{Status: tc.status, Body: tc.body} })
		_, err := newTestMailgun(t, f.URL).Send(context.Background(),
			apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
		e := apiClassOf(t, err)
		if e.Class != tc.want {
			t.Errorf("%d: class = %v, want %v (%v)", tc.status, e.Class, tc.want, err)
		}
		if strings.HasPrefix(tc.body, `{"message":"`) && !strings.Contains(e.Reason, tc.body[12:min(30, len(tc.body)-2)]) {
			t.Errorf("%d: reason %q should quote the message", tc.status, e.Reason)
		}
	}
}

// A domain the SDK refuses before sending is a configuration problem.
func TestMailgun_InvalidDomain(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return mailgunOK("<id>") })
	u := newTestMailgun(t, f.URL, func(c *Config) { c.Domain = "bad domain;" })
	msg := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
	if _, err := u.Send(context.Background(), msg); ClassOf(err) != ProviderFault {
		t.Errorf("invalid domain: %v, want provider_fault", err)
	}
	if len(f.Requests()) != 0 {
		t.Error("request sent for an invalid domain")
	}
}

func TestMailgun_SecretLeak(t *testing.T) {
	t.Parallel()
	fail := fakes.JSON(401, `{"message":"Invalid private key `+mailgunTestKey+`"}`)
	apiLeakTest(t, []string{mailgunTestKey}, fail, func(url string, log *slog.Logger, timeout time.Duration) Upstream {
		u, err := newMailgun(Config{Name: "mailgun-leak", Type: "mailgun", Region: "eu", Domain: mailgunTestDomain,
			APIKey: mailgunTestKey, Endpoint: url, Timeout: timeout}, Deps{Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		return u
	})
}

// mailgunBigMessage is a MIME message of about size bytes with a base64
// attachment of random bytes from seed.
func mailgunBigMessage(size int, seed byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: alice@example.com\r\nTo: bob@example.net\r\nSubject: big %d\r\nMIME-Version: 1.0\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n", seed)
	raw := make([]byte, 57)
	rng := rand.NewChaCha8([32]byte{seed})
	for b.Len() < size {
		rng.Read(raw)
		b.WriteString(base64.StdEncoding.EncodeToString(raw))
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// spooledMessage puts data in a file after a header block, as the spool
// does, and returns a Message whose Body is that section of the file.
func spooledMessage(t *testing.T, data []byte, rcpts []string) *Message {
	t.Helper()
	const header = "spool header block, not part of the message\n"
	path := filepath.Join(t.TempDir(), "msg")
	if err := os.WriteFile(path, append([]byte(header), data...), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &Message{ID: "spool-big", From: "alice@example.com", To: rcpts, AllRcpts: rcpts,
		Body: io.NewSectionReader(f, int64(len(header)), int64(len(data)))}
}

// mailgunCall is one messages.mime request as the streaming fake saw it.
type mailgunCall struct {
	method, path, user, pass string
	contentLength, read      int64
	transferEncoding         []string
	to                       []string
	message                  []byte
	filename                 string
	other                    []string
}

// newMailgunMIMEFake is an httptest fake of POST /v3/{domain}/messages.mime
// that decodes each request with mime/multipart and records it.
func newMailgunMIMEFake(t *testing.T) (url string, calls func() []mailgunCall) {
	t.Helper()
	var mu sync.Mutex
	var got []mailgunCall
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := mailgunCall{method: r.Method, path: r.URL.Path, contentLength: r.ContentLength, transferEncoding: r.TransferEncoding}
		c.user, c.pass, _ = r.BasicAuth()
		raw, err := io.ReadAll(r.Body)
		c.read = int64(len(raw))
		mt, params, perr := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if err != nil || perr != nil || mt != "multipart/form-data" {
			http.Error(w, `{"message":"not a multipart form"}`, http.StatusBadRequest)
			return
		}
		mr := multipart.NewReader(bytes.NewReader(raw), params["boundary"])
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				http.Error(w, `{"message":"bad multipart"}`, http.StatusBadRequest)
				return
			}
			data, _ := io.ReadAll(p)
			switch p.FormName() {
			case "to":
				c.to = append(c.to, string(data))
			case "message":
				c.message, c.filename = data, p.FileName()
			default:
				c.other = append(c.other, p.FormName())
			}
		}
		mu.Lock()
		got = append(got, c)
		n := len(got)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"<mg-%d@mg.example.com>","message":"Queued. Thank you."}`, n)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func() []mailgunCall {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}
}

// checkMailgunCall checks one request against the documented format and
// against m, the spooled message data and the recipients rcpts.
func checkMailgunCall(t *testing.T, c mailgunCall, data []byte, rcpts []string) {
	t.Helper()
	if c.method != http.MethodPost || c.path != "/v3/"+mailgunTestDomain+"/messages.mime" {
		t.Errorf("request = %s %s, want POST /v3/%s/messages.mime", c.method, c.path, mailgunTestDomain)
	}
	if c.user != "api" || c.pass != mailgunTestKey {
		t.Errorf("basic auth = %q/%q, want api/<key>", c.user, c.pass)
	}
	if len(c.transferEncoding) != 0 || c.contentLength != c.read || c.read <= int64(len(data)) {
		t.Errorf("Content-Length %d, transfer encoding %q, %d bytes read: want the exact length of the form around the %d-byte message",
			c.contentLength, c.transferEncoding, c.read, len(data))
	}
	if !slices.Equal(c.to, rcpts) {
		t.Errorf("to fields = %q, want %q", c.to, rcpts)
	}
	if !bytes.Equal(c.message, data) {
		t.Errorf("message part: %d bytes, want the %d spooled bytes exactly", len(c.message), len(data))
	}
	if c.filename == "" || len(c.other) != 0 {
		t.Errorf("message file name %q, other fields %q", c.filename, c.other)
	}
}

// A spooled message of a few MB reaches Mailgun whole, streamed (the
// form the SDK builds holds only a marker in its place).
func TestMailgun_StreamsSpooledMessage(t *testing.T) {
	t.Parallel()
	url, calls := newMailgunMIMEFake(t)
	data := mailgunBigMessage(3<<20, 1)
	rcpts := []string{"bob@example.net", "carol@example.org", "hidden@example.com"}
	rc, err := newTestMailgun(t, url).Send(context.Background(), spooledMessage(t, data, rcpts))
	if err != nil || rc.ProviderID != "<mg-1@mg.example.com>" {
		t.Fatalf("Send: id %q, %v", rc.ProviderID, err)
	}
	cs := calls()
	if len(cs) != 1 {
		t.Fatalf("%d requests, want 1", len(cs))
	}
	checkMailgunCall(t, cs[0], data, rcpts)
}

// Concurrent sends through one upstream (one client, one transport) each
// stream their own message.
func TestMailgun_ConcurrentStreams(t *testing.T) {
	t.Parallel()
	url, calls := newMailgunMIMEFake(t)
	u := newTestMailgun(t, url)
	type sent struct {
		data  []byte
		rcpts []string
	}
	msgs := []sent{
		{mailgunBigMessage(1<<20, 2), []string{"first@example.net"}},
		{mailgunBigMessage(3<<19, 3), []string{"second@example.net", "second-bcc@example.org"}},
	}
	const rounds = 4
	for range rounds {
		var wg sync.WaitGroup
		for _, mm := range msgs {
			m := spooledMessage(t, mm.data, mm.rcpts)
			wg.Go(func() {
				if _, err := u.Send(context.Background(), m); err != nil {
					t.Errorf("Send to %s: %v", m.To[0], err)
				}
			})
		}
		wg.Wait()
	}
	cs := calls()
	if len(cs) != rounds*len(msgs) {
		t.Fatalf("%d requests, want %d", len(cs), rounds*len(msgs))
	}
	for _, c := range cs {
		i := slices.IndexFunc(msgs, func(mm sent) bool { return len(c.to) > 0 && mm.rcpts[0] == c.to[0] })
		if i < 0 {
			t.Fatalf("request for %q, sent to no one", c.to)
		}
		checkMailgunCall(t, c, msgs[i].data, msgs[i].rcpts)
	}
}

type mailgunRoundTrip func(*http.Request) (*http.Response, error)

func (f mailgunRoundTrip) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// The transport splices the body around the marker, with a GetBody that
// reads the same bytes again, and leaves other requests alone.
func TestMailgun_StreamTransport(t *testing.T) {
	t.Parallel()
	var sent *http.Request
	tr := mailgunStreamTransport{base: mailgunRoundTrip(func(r *http.Request) (*http.Response, error) {
		sent = r
		return &http.Response{StatusCode: 200, Body: http.NoBody, Request: r}, nil
	})}
	msg := []byte("Subject: hi\r\n\r\nthe message\r\n")
	ctx, marker := withMailgunStream(context.Background(), BytesBody(msg))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://mailgun.invalid/", strings.NewReader("pre|"+marker+"|post"))
	if _, err := tr.RoundTrip(req); err != nil {
		t.Fatal(err)
	}
	want := "pre|" + string(msg) + "|post"
	first, _ := io.ReadAll(sent.Body)
	again, _ := sent.GetBody()
	second, _ := io.ReadAll(again)
	if string(first) != want || string(second) != want || sent.ContentLength != int64(len(want)) {
		t.Errorf("body %q, GetBody %q, Content-Length %d; want %q (%d)", first, second, sent.ContentLength, want, len(want))
	}

	for _, body := range []string{"no marker", marker + marker} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://mailgun.invalid/", strings.NewReader(body))
		if _, err := tr.RoundTrip(req); !errors.Is(err, errPlaceholder) {
			t.Errorf("form %q: %v, want errPlaceholder", body, err)
		}
	}

	wrapped := fmt.Errorf("while making http request: %w", &neturl.Error{Op: "Post", URL: "http://mailgun.invalid/", Err: errPlaceholder})
	if e := newTestMailgun(t, "").classify(ctx, wrapped, &apiProgress{}); e.Class != ProviderFault {
		t.Errorf("marker missing: class %v, want provider_fault: every message would fail", e.Class)
	}

	plain, _ := http.NewRequest(http.MethodPost, "http://mailgun.invalid/", strings.NewReader(marker))
	if _, err := tr.RoundTrip(plain); err != nil || sent != plain {
		t.Errorf("a request without a stream was not passed on as is (%v)", err)
	}
}
