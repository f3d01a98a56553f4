package upstreams

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
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
