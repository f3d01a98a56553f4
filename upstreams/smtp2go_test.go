package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
)

const smtp2goTestKey = "api-5E1F2A3B4C5D6E7F8091A2B3C4D5E6F7"

func newTestSMTP2GO(t *testing.T, endpoint string) *smtp2goUpstream {
	t.Helper()
	u, err := newSMTP2GO(Config{Name: "smtp2go-test", Type: "smtp2go", APIKey: smtp2goTestKey,
		Endpoint: endpoint, Timeout: 5 * time.Second}, Deps{})
	if err != nil {
		t.Fatalf("newSMTP2GO: %v", err)
	}
	return u
}

func smtp2goOK(id string) fakes.Reply {
	return fakes.JSON(200, `{"request_id":"aa253464-0bd0-467a-b24b-6159dcd7be60","data":{"succeeded":1,"failed":0,"failures":[],"email_id":"`+id+`"}}`)
}

// decodeSMTP2GORequest validates a request against the documented format
// (POST /v3/email/mime, X-Smtp2go-Api-Key, JSON {"mime_email": base64})
// and returns the decoded MIME bytes.
func decodeSMTP2GORequest(t *testing.T, r fakes.Request) []byte {
	t.Helper()
	if r.Method != http.MethodPost || r.Path != "/v3/email/mime" {
		t.Errorf("request = %s %s, want POST /v3/email/mime", r.Method, r.Path)
	}
	if got := r.Header.Get("X-Smtp2go-Api-Key"); got != smtp2goTestKey {
		t.Errorf("X-Smtp2go-Api-Key = %q", got)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var body map[string]any
	if err := json.Unmarshal(r.Body, &body); err != nil {
		t.Fatalf("body is not JSON: %v", err)
	}
	if len(body) != 1 {
		t.Errorf("body fields %v, want only mime_email (the key goes in the header)", body)
	}
	s, _ := body["mime_email"].(string)
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil || s == "" {
		t.Fatalf("mime_email is not base64: %v", err)
	}
	return raw
}

func TestSMTP2GO_Request(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		headerTo []string
		envelope []string
		bcc      string // "" = no Bcc header may be added
	}{
		{"all in To", []string{"Bob <bob@example.net>", "carol@example.org"}, []string{"bob@example.net", "Carol@Example.org"}, ""},
		{"envelope-only become Bcc", []string{"Bob <bob@example.net>"}, []string{"bob@example.net", "hidden@example.org", "second@example.com"},
			"Bcc: hidden@example.org,\r\n second@example.com\r\n"},
		{"duplicates once", []string{"bob@example.net"}, []string{"x@example.org", "X@example.org", "bob@example.net"}, "Bcc: x@example.org\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return smtp2goOK("1u0SwL-4Ixn2e-Nf") })
			m := apiTestMessage("alice@example.com", tc.headerTo, tc.envelope)
			orig := bodyOf(m)
			rc, err := newTestSMTP2GO(t, f.URL).Send(context.Background(), m)
			id := rc.ProviderID
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			if id != "1u0SwL-4Ixn2e-Nf" {
				t.Errorf("id = %q", id)
			}
			if !bytes.Equal(bodyOf(m), orig) {
				t.Fatal("Send modified m.Data")
			}
			reqs := f.Requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			got := decodeSMTP2GORequest(t, reqs[0])
			if want := append([]byte(tc.bcc), orig...); !bytes.Equal(got, want) {
				t.Errorf("mime_email decodes to\n%q\nwant\n%q", got, want)
			}
		})
	}
}

func TestSMTP2GO_HeaderRecipients(t *testing.T) {
	t.Parallel()
	data := "From: a@example.com\r\n" +
		"To: \"Doe, John\" <John@Example.com>, undisclosed-recipients:;\r\n" +
		"Cc: =?iso-2022-jp?B?GyRCJUYlOSVIGyhC?= <jp@example.jp>,\r\n broken <<x@y>, ok@example.org\r\n" +
		"Bcc: already@example.net\r\n" +
		"Subject: s\r\n\r\nbody\r\n"
	got := headerRecipients([]byte(data))
	for _, want := range []string{"john@example.com", "jp@example.jp", "ok@example.org", "already@example.net"} {
		if !got[want] {
			t.Errorf("%s not found in headers: %v", want, got)
		}
	}
	// Unparseable headers mean "nobody is named": every envelope
	// recipient then goes to Bcc; nobody is ever left out.
	if n := len(headerRecipients([]byte("not a header block"))); n != 0 {
		t.Errorf("garbage: %d recipients", n)
	}
	// An existing Bcc field is extended, never duplicated.
	m := &Message{To: []string{"b@example.com", "x@example.org"},
		Body: BytesBody([]byte("From: a@example.com\r\nBcc: c@example.com\r\nTo: b@example.com\r\n\r\nhi\r\n"))}
	mime := string(withBccHeader(m, bodyOf(m), headerRecipients(bodyOf(m))))
	if strings.Count(mime, "Bcc:") != 1 || !strings.Contains(mime, "Bcc: c@example.com,\r\n x@example.org\r\n") ||
		!strings.HasSuffix(mime, "To: b@example.com\r\n\r\nhi\r\n") {
		t.Errorf("merged Bcc: %q", mime)
	}
}

// SMTP2GO mails every header address: a delivery that covers only some of
// the message's recipients (route split, retry after a partial delivery)
// must go elsewhere rather than mail the others twice.
func TestSMTP2GO_RefusesWhenHeadersNameOtherDeliveries(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return smtp2goOK("id-1") })
	u := newTestSMTP2GO(t, f.URL)
	m := apiTestMessage("alice@example.com", []string{"bob@example.net", "carol@example.org"}, []string{"carol@example.org"})
	m.AllRcpts = []string{"bob@example.net", "carol@example.org"}
	if _, err := u.Send(context.Background(), m); ClassOf(err) != Unsupported || !strings.Contains(err.Error(), "bob@example.net") {
		t.Errorf("partial delivery: %v, want unsupported naming bob", err)
	}
	if len(f.Requests()) != 0 {
		t.Error("request sent anyway")
	}
	// A header address that is no envelope recipient at all (a list alias)
	// is unaffected.
	m.AllRcpts = []string{"carol@example.org"}
	if _, err := u.Send(context.Background(), m); err != nil {
		t.Errorf("alias in To: %v", err)
	}
}

func TestSMTP2GO_EndpointWithVersion(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return smtp2goOK("id-1") })
	// The docs give region bases as https://eu-api.smtp2go.com/v3.
	u := newTestSMTP2GO(t, f.URL+"/v3/")
	if _, err := u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})); err != nil {
		t.Fatal(err)
	}
	if p := f.Requests()[0].Path; p != "/v3/email/mime" {
		t.Errorf("path = %q", p)
	}
	if def := newTestSMTP2GO(t, "").url; def != "https://api.smtp2go.com/v3/email/mime" {
		t.Errorf("default URL = %q", def)
	}
}

// A 200 can still report failures (fastaccept off).
func TestSMTP2GO_FailedIn200(t *testing.T) {
	t.Parallel()
	env := []string{"bob@example.net", "carol@example.org"}
	for _, tc := range []struct {
		name          string
		body          string
		want          Class
		rcpts         []string
		delivered, id string
	}{
		{"all named", `{"data":{"succeeded":0,"failed":1,"failures":["bob@example.net: on suppression list","carol@example.org: invalid"],"email_id":""}}`,
			Rejected, nil, "", ""},
		{"some named, others sent", `{"data":{"succeeded":1,"failed":1,"failures":["carol@example.org: recipient rejected"],"email_id":"e-1"}}`,
			Rejected, []string{"carol@example.org"}, "e-1", "e-1"},
		{"some named, none sent", `{"data":{"succeeded":0,"failed":1,"failures":["carol@example.org: recipient rejected"]}}`,
			Transient, nil, "", ""},
		{"nobody named", `{"data":{"succeeded":0,"failed":1,"failures":["internal processing error"]}}`,
			Transient, nil, "", ""},
		{"substring is not a name", `{"data":{"succeeded":0,"failed":1,"failures":["xbob@example.net.invalid refused"]}}`,
			Transient, nil, "", ""},
		{"object failures", `{"data":{"succeeded":0,"failed":1,"failures":[{"email":"bob@example.net","error":"bounced"},{"email":"carol@example.org","error":"bounced"}]}}`,
			Rejected, nil, "", ""},
		{"sender not verified", `{"data":{"succeeded":0,"failed":1,"failures":["Sender domain not verified for bob@example.net"]}}`,
			SenderRejected, nil, "", ""},
		{"rate limit", `{"data":{"succeeded":0,"failed":1,"failures":["rate limit exceeded, try again later"]}}`,
			Transient, nil, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.JSON(200, tc.body) })
			rc, err := newTestSMTP2GO(t, f.URL).Send(context.Background(), apiTestMessage("alice@example.com", env, env))
			id := rc.ProviderID
			var e *Error
			var refused []string
			if tc.rcpts != nil {
				e, refused = refusedErr(t, rc, err), rc.RefusedRcpts()
			} else {
				e = apiClassOf(t, err)
			}
			if e.Class != tc.want {
				t.Errorf("class = %v, want %v (%v)", e.Class, tc.want, e)
			}
			if !slices.Equal(refused, tc.rcpts) || rc.ProviderID != tc.delivered || id != tc.id {
				t.Errorf("Refused %q ProviderID %q id %q, want %q %q %q", refused, rc.ProviderID, id, tc.rcpts, tc.delivered, tc.id)
			}
		})
	}
}

func TestSMTP2GO_DocumentedErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status int
		body   string
		want   Class
		code   string
	}{
		{400, `{"request_id":"r","data":{"error_code":"E_ApiResponseCodes.NON_VALIDATING_IN_PAYLOAD","error":"An error occurred processing the json data","field_validation_errors":{"fieldname":"mime_email","message":"invalid"}}}`,
			Rejected, "400 NON_VALIDATING_IN_PAYLOAD"},
		{400, `{"request_id":"r","data":{"error_code":"E_ApiResponseCodes.ENDPOINT_PERMISSION_DENIED","error":"The API key does not have permission to access this endpoint"}}`,
			ProviderFault, "400 ENDPOINT_PERMISSION_DENIED"},
		{400, `{"error":"Sender address is not verified","error_code":"E_ApiResponseCodes.API_EXCEPTION"}`,
			SenderRejected, "400 API_EXCEPTION"},
		{401, `{"data":{"error":"No valid API key was provided","error_code":"E_ApiResponseCodes.API_KEY_INVALID"}}`, ProviderFault, "401 API_KEY_INVALID"},
		{402, `{"data":{"error":"The parameters were valid but the request failed"}}`, ProviderFault, "402"},
		{403, `{"data":{"error":"The API key doesn't have permission"}}`, ProviderFault, "403"},
		{429, `{"data":{"error":"Too many requests"}}`, Transient, "429"},
		{503, `<html>Service Unavailable</html>`, Transient, "503"},
	} {
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return fakes.JSON(tc.status, tc.body) })
		_, err := newTestSMTP2GO(t, f.URL).Send(context.Background(),
			apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
		e := apiClassOf(t, err)
		if e.Class != tc.want || e.Code != tc.code {
			t.Errorf("%d %.60s: class/code = %v/%q, want %v/%q (%v)", tc.status, tc.body, e.Class, e.Code, tc.want, tc.code, err)
		}
	}
}

func TestSMTP2GO_StatusSweep(t *testing.T) {
	t.Parallel()
	for status := 200; status <= 599; status++ {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
				if status < 300 {
					r := smtp2goOK("sweep-id")
					r.Status = status
					return r
				}
				return fakes.JSON(status, `{"request_id":"r","data":{"error":"scripted failure"}}`)
			})
			rc, err := newTestSMTP2GO(t, f.URL).Send(context.Background(),
				apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			id := rc.ProviderID
			if status < 300 && status != http.StatusNoContent {
				if err != nil || id != "sweep-id" {
					t.Errorf("id %q, err %v: want success", id, err)
				}
				return
			}
			e := apiClassOf(t, err)
			if want := apiSweepWant(status); e.Class != want {
				t.Errorf("class = %v, want %v (%v)", e.Class, want, err)
			}
			if !strings.HasPrefix(e.Code, strconv.Itoa(status)) {
				t.Errorf("code = %q, want %d", e.Code, status)
			}
		})
	}
}

func TestSMTP2GO_SecretLeak(t *testing.T) {
	t.Parallel()
	fail := fakes.JSON(401, `{"data":{"error":"Invalid API key `+smtp2goTestKey+`","error_code":"E_ApiResponseCodes.API_KEY_INVALID"}}`)
	apiLeakTest(t, []string{smtp2goTestKey}, fail, func(url string, log *slog.Logger, timeout time.Duration) Upstream {
		u, err := newSMTP2GO(Config{Name: "smtp2go-leak", Type: "smtp2go", APIKey: smtp2goTestKey,
			Endpoint: url, Timeout: timeout}, Deps{Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		return u
	})
}
