package upstreams

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/relaycar/relaycar/internal/fakes"
)

const (
	sesTestKeyID  = "AKIDRELAYCARTEST0001"
	sesTestSecret = "ses-secret-Zx81QvTq0LmN7pRb"
)

func newTestSES(t *testing.T, endpoint string, mod ...func(*Config)) *sesUpstream {
	t.Helper()
	c := Config{
		Name: "ses-test", Type: "ses", Region: "us-east-1",
		AccessKeyID: sesTestKeyID, SecretAccessKey: sesTestSecret,
		Endpoint: endpoint, Timeout: 5 * time.Second,
	}
	for _, f := range mod {
		f(&c)
	}
	u, err := newSES(c, Deps{})
	if err != nil {
		t.Fatalf("newSES: %v", err)
	}
	return u
}

// sesRequest is the JSON body of SendEmail as the SDK sends it.
type sesRequest struct {
	FromEmailAddress     string
	ConfigurationSetName string
	Destination          struct{ ToAddresses, CcAddresses, BccAddresses []string }
	Content              struct{ Raw struct{ Data string } }
}

func decodeSESRequest(t *testing.T, r fakes.Request) sesRequest {
	t.Helper()
	var v sesRequest
	if err := json.Unmarshal(r.Body, &v); err != nil {
		t.Fatalf("request body is not JSON: %v\n%s", err, r.Body)
	}
	return v
}

func sesOK(id string) fakes.Reply {
	return fakes.JSON(200, `{"MessageId":"`+id+`"}`)
}

// sesError is an SES error answer as the service sends it: the code in
// x-amzn-ErrorType and a JSON body with the message.
func sesError(status int, code, msg string) fakes.Reply {
	return fakes.Reply{Status: status, Header: map[string]string{
		"Content-Type":     "application/json",
		"x-amzn-ErrorType": code + ":http://internal.amazon.com/coral/com.amazonaws.sesv2/",
		"x-amzn-RequestId": "req-1",
	}, Body: fmt.Sprintf(`{"message":%q}`, msg)}
}

// --- against the real local emulator (npm aws-ses-v2-local) ---

// sesEmulatorCLI finds the emulator installed by scripts/ses-emulator.sh.
func sesEmulatorCLI(t *testing.T) (node, cli string) {
	t.Helper()
	dir := os.Getenv("RELAYCAR_SES_EMULATOR_DIR")
	if dir == "" {
		root, err := filepath.Abs("..") // go test runs in upstreams/
		if err != nil {
			t.Fatal(err)
		}
		dir = filepath.Join(root, ".cache", "npm")
	}
	cli = filepath.Join(dir, "node_modules", "aws-ses-v2-local", "dist", "cli.js")
	if _, err := os.Stat(cli); err != nil {
		t.Fatalf("SES emulator (npm aws-ses-v2-local@2.10.2) is not installed at %s: run `scripts/ses-emulator.sh install` "+
			"(or set RELAYCAR_SES_EMULATOR_DIR to its npm prefix)", cli)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node is not on PATH; the SES emulator needs it (apt-get install nodejs): %v", err)
	}
	return node, cli
}

// freeLoopbackPort returns a port that was free on 127.0.0.1 a moment ago;
// the emulator is a separate process, so it cannot take over a listener.
func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// lockedBuffer collects a child process's output for failure messages.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startSESEmulator runs the emulator on a free loopback port and returns
// its base URL once /health-check answers. It is killed when the test ends.
func startSESEmulator(t *testing.T) string {
	t.Helper()
	return startSESEmulatorEnv(t)
}

// startSESEmulatorEnv is startSESEmulator with extra environment, e.g.
// AWS_SES_ACCOUNT (the GetAccount answer).
func startSESEmulatorEnv(t *testing.T, env ...string) string {
	t.Helper()
	node, cli := sesEmulatorCLI(t)
	var lastOut string
	for attempt := 0; attempt < 3; attempt++ { // the port may be taken between probe and bind
		port := freeLoopbackPort(t)
		out := &lockedBuffer{}
		cmd := exec.Command(node, cli, "--host", "127.0.0.1", "--port", strconv.Itoa(port))
		cmd.Stdout, cmd.Stderr = out, out
		cmd.Env = append(os.Environ(), env...)
		if err := cmd.Start(); err != nil {
			t.Fatalf("start SES emulator: %v", err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		stop := func() {
			cmd.Process.Kill()
			<-exited
		}
		base := "http://127.0.0.1:" + strconv.Itoa(port)
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-exited:
				deadline = time.Time{}
				continue
			default:
			}
			resp, err := http.Get(base + "/health-check")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					t.Cleanup(stop)
					return base
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		stop()
		lastOut = out.String()
	}
	t.Fatalf("SES emulator did not become healthy; output:\n%s", lastOut)
	return ""
}

type sesStore struct {
	Emails []struct {
		MessageID   string `json:"messageId"`
		From        string `json:"from"`
		Destination struct {
			To, Cc, Bcc []string
		} `json:"destination"`
		Subject string `json:"subject"`
		Body    struct {
			Text string `json:"text"`
			HTML string `json:"html"`
		} `json:"body"`
	} `json:"emails"`
}

func TestSES_Emulator(t *testing.T) {
	t.Parallel()
	base := startSESEmulator(t)
	u := newTestSES(t, base)
	m := apiTestMessage("alice@example.com", []string{"Bob <bob@example.net>"}, []string{"bob@example.net", "dave@example.org"})
	rc, err := u.Send(context.Background(), m)
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if id == "" {
		t.Fatal("Send returned no MessageId")
	}

	resp, err := http.Get(base + "/store")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st sesStore
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("decode /store: %v", err)
	}
	if len(st.Emails) != 1 {
		t.Fatalf("emulator stored %d emails, want 1: %+v", len(st.Emails), st)
	}
	e := st.Emails[0]
	if e.MessageID != id {
		t.Errorf("stored messageId %q, Send returned %q", e.MessageID, id)
	}
	if !strings.Contains(e.From, "alice@example.com") || !strings.Contains(e.From, "Alice Example") {
		t.Errorf("from = %q, want the From header of the raw message", e.From)
	}
	if e.Subject != "relaycar adapter test" {
		t.Errorf("subject = %q", e.Subject)
	}
	// The emulator derives to/cc from the raw headers and ignores
	// Destination (so the Bcc-only dave@ cannot be seen here; the fake
	// tests below assert Destination).
	if len(e.Destination.To) != 1 || !strings.Contains(e.Destination.To[0], "bob@example.net") {
		t.Errorf("to = %q, want [Bob <bob@example.net>]", e.Destination.To)
	}
	if !strings.Contains(e.Body.Text, "Hello from the relaycar adapter test.") {
		t.Errorf("text = %q", e.Body.Text)
	}
}

// --- against an in-process fake speaking the SES v2 wire format ---

func TestSES_Request(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("ses-0001") })
	u := newTestSES(t, f.URL, func(c *Config) { c.ConfigurationSet = "relaycar-events" })
	m := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net", "hidden@example.org"})
	orig := bodyOf(m)

	rc, err := u.Send(context.Background(), m)
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if id != "ses-0001" {
		t.Errorf("id = %q, want ses-0001", id)
	}
	reqs := f.Requests()
	if len(reqs) != 1 {
		t.Fatalf("fake got %d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Method != http.MethodPost || r.Path != "/v2/email/outbound-emails" {
		t.Errorf("request = %s %s, want POST /v2/email/outbound-emails", r.Method, r.Path)
	}
	if a := r.Header.Get("Authorization"); !strings.HasPrefix(a, "AWS4-HMAC-SHA256 Credential="+sesTestKeyID+"/") ||
		!strings.Contains(a, "/us-east-1/ses/aws4_request") {
		t.Errorf("Authorization = %q, want SigV4 with the static key for us-east-1/ses", a)
	}
	if got := r.Header.Get("amz-sdk-request"); got != "" && !strings.Contains(got, "max=1") {
		t.Errorf("amz-sdk-request = %q, want max=1 (the relay owns retries)", got)
	}
	body := decodeSESRequest(t, r)
	if body.FromEmailAddress != "alice@example.com" {
		t.Errorf("FromEmailAddress = %q", body.FromEmailAddress)
	}
	if body.ConfigurationSetName != "relaycar-events" {
		t.Errorf("ConfigurationSetName = %q", body.ConfigurationSetName)
	}
	if !slices.Equal(body.Destination.ToAddresses, m.To) || body.Destination.CcAddresses != nil || body.Destination.BccAddresses != nil {
		t.Errorf("Destination = %+v, want ToAddresses = envelope %q only", body.Destination, m.To)
	}
	raw, err := base64.StdEncoding.DecodeString(body.Content.Raw.Data)
	if err != nil {
		t.Fatalf("Raw.Data is not base64: %v", err)
	}
	if !bytes.Equal(raw, orig) {
		t.Errorf("Raw.Data decodes to\n%q\nwant the input bytes\n%q", raw, orig)
	}
	if !bytes.Equal(bodyOf(m), orig) {
		t.Error("Send modified m.Data")
	}
}

func TestSES_NullSenderOmitsFromEmailAddress(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("ses-bounce") })
	u := newTestSES(t, f.URL)
	m := apiTestMessage("mailer-daemon@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
	m.From = ""
	if _, err := u.Send(context.Background(), m); err != nil {
		t.Fatalf("Send: %v", err)
	}
	if strings.Contains(string(f.Requests()[0].Body), "FromEmailAddress") {
		t.Errorf("null sender: request carries FromEmailAddress: %s", f.Requests()[0].Body)
	}
}

func TestSES_ChunksOf50(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(n int, _ fakes.Request) fakes.Reply { return sesOK(fmt.Sprintf("ses-%d", n)) })
	u := newTestSES(t, f.URL)
	rcpts := apiRcpts(120)
	rc, err := u.Send(context.Background(), apiTestMessage("alice@example.com", rcpts[:1], rcpts))
	id := rc.ProviderID
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if id != "ses-0" {
		t.Errorf("id = %q, want the first call's ses-0", id)
	}
	reqs := f.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d calls for 120 recipients, want 3", len(reqs))
	}
	for i, want := range [][]string{rcpts[:50], rcpts[50:100], rcpts[100:]} {
		if got := decodeSESRequest(t, reqs[i]).Destination.ToAddresses; !slices.Equal(got, want) {
			t.Errorf("call %d: %d recipients %q..., want %d", i, len(got), got[:min(2, len(got))], len(want))
		}
	}
}

// Models SES throttling the account in the middle of a large send.
func TestSES_LaterChunkFails(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(n int, _ fakes.Request) fakes.Reply {
		if n == 0 {
			return sesOK("ses-first")
		}
		return sesError(429, "TooManyRequestsException", "Maximum sending rate exceeded.")
	})
	u := newTestSES(t, f.URL)
	rcpts := apiRcpts(120)
	rc, err := u.Send(context.Background(), apiTestMessage("alice@example.com", rcpts[:1], rcpts))
	e := refusedErr(t, rc, err)
	if e.Class != Transient || e.Code != "TooManyRequestsException" {
		t.Errorf("class/code = %v/%s, want transient/TooManyRequestsException", e.Class, e.Code)
	}
	if !slices.Equal(rc.RefusedRcpts(), rcpts[50:]) {
		t.Errorf("Recipients = %d addresses, want the 70 not yet delivered", len(rc.RefusedRcpts()))
	}
	if rc.ProviderID != "ses-first" {
		t.Errorf("ProviderID = %q, want ses-first", rc.ProviderID)
	}
	if len(f.Requests()) != 2 {
		t.Errorf("%d calls, want 2 (stop at the first failure)", len(f.Requests()))
	}
}

func TestSES_ErrorCodes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		status int
		code   string
		msg    string
		want   Class
	}{
		{400, "MessageRejected", "Email address is not verified. The following identities failed the check in region US-EAST-1: alice@example.com", SenderRejected},
		{400, "MessageRejected", "Illegal address", Rejected},
		{400, "MessageRejected", "Message contains a virus", Rejected},
		{400, "MailFromDomainNotVerifiedException", "MAIL FROM domain is not verified", SenderRejected},
		{400, "AccountSuspendedException", "Your account has been suspended", ProviderFault},
		{400, "SendingPausedException", "Sending is paused for this account", ProviderFault},
		{403, "AccessDeniedException", "User is not authorized to perform ses:SendEmail", ProviderFault},
		{403, "AccessDenied", "Access denied", ProviderFault},
		{403, "UnrecognizedClientException", "The security token included in the request is invalid.", ProviderFault},
		{403, "SignatureDoesNotMatch", "The request signature we calculated does not match", ProviderFault},
		{403, "InvalidClientTokenId", "The security token included in the request is invalid", ProviderFault},
		{404, "NotFoundException", "Configuration set <relaycar> does not exist.", ProviderFault},
		{429, "TooManyRequestsException", "Maximum sending rate exceeded.", Transient},
		{400, "LimitExceededException", "Daily message quota exceeded.", Transient},
		{400, "Throttling", "Rate exceeded", Transient},
		{400, "ThrottlingException", "Rate exceeded", Transient},
		{400, "BadRequestException", "Invalid email address", Rejected},
		// Unknown codes fall back to the status.
		{500, "InternalFailure", "internal error", Transient},
		{503, "ServiceUnavailable", "try later", Transient},
		{400, "SomeFutureException", "new", Rejected},
		{403, "SomeFutureException", "new", ProviderFault},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%d_%s_%s", tc.status, tc.code, tc.want), func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesError(tc.status, tc.code, tc.msg) })
			_, err := newTestSES(t, f.URL).Send(context.Background(),
				apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			e := apiClassOf(t, err)
			if e.Class != tc.want {
				t.Errorf("class = %v, want %v (%v)", e.Class, tc.want, err)
			}
			if e.Code != tc.code {
				t.Errorf("code = %q, want %q", e.Code, tc.code)
			}
			if !strings.Contains(e.Reason, strconv.Itoa(tc.status)) || !strings.Contains(e.Reason, tc.msg[:min(10, len(tc.msg))]) {
				t.Errorf("reason %q should carry the status and the message", e.Reason)
			}
			if len(f.Requests()) != 1 {
				t.Errorf("%d calls, want 1: the SDK must not retry", len(f.Requests()))
			}
		})
	}
}

// Every status with an error code SES does not document: the class comes
// from the status. 2xx answers carry a MessageId and succeed.
func TestSES_StatusSweepUnknownCode(t *testing.T) {
	t.Parallel()
	for status := 200; status <= 599; status++ {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
				if status < 300 {
					r := sesOK("ses-sweep")
					r.Status = status
					return r
				}
				return sesError(status, "SomethingNewException", "an error SES added later")
			})
			rc, err := newTestSES(t, f.URL).Send(context.Background(),
				apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			id := rc.ProviderID
			if status < 300 {
				if status == http.StatusNoContent {
					// No body can carry the MessageId.
					if c := ClassOf(err); err == nil || c != Ambiguous {
						t.Errorf("id %q, err %v: want ambiguous (2xx without MessageId)", id, err)
					}
					return
				}
				if err != nil || id != "ses-sweep" {
					t.Errorf("id %q, err %v: want success", id, err)
				}
				return
			}
			e := apiClassOf(t, err)
			if want := apiSweepWant(status); e.Class != want {
				t.Errorf("class = %v, want %v (%v)", e.Class, want, err)
			}
		})
	}
}

// A proxy in front of SES answering with HTML: no error code at all.
func TestSES_UndecodableErrorBody(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status int
		want   Class
	}{{502, Transient}, {413, Unsupported}, {403, ProviderFault}, {200, Ambiguous}} {
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
			return fakes.Reply{Status: tc.status, Header: map[string]string{"Content-Type": "text/html"}, Body: "<html>Bad Gateway</html>"}
		})
		_, err := newTestSES(t, f.URL).Send(context.Background(),
			apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
		if e := apiClassOf(t, err); e.Class != tc.want {
			t.Errorf("HTML %d: class = %v, want %v (%v)", tc.status, e.Class, tc.want, err)
		}
	}
}

func TestSES_SMTPUTF8IsRefusedBeforeTheAPI(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ from, rcpt string }{
		{"alice@example.com", "jörg@example.net"},
		{"alice@example.com", "bob@bücher.example"},
		{"jörg@example.com", "bob@example.net"},
	} {
		f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("never") })
		m := apiTestMessage(tc.from, []string{"bob@example.net"}, []string{"bob@example.net", tc.rcpt})
		_, err := newTestSES(t, f.URL).Send(context.Background(), m)
		e := apiClassOf(t, err)
		if e.Class != Unsupported || e.Code != "SMTPUTF8" {
			t.Errorf("%s -> %s: class/code = %v/%s, want unsupported/SMTPUTF8", tc.from, tc.rcpt, e.Class, e.Code)
		}
		if n := len(f.Requests()); n != 0 {
			t.Errorf("%s -> %s: the API was called %d times", tc.from, tc.rcpt, n)
		}
	}
}

func TestSES_SecretLeak(t *testing.T) {
	t.Parallel()
	// An auth failure whose message quotes the key id and, as a worst case,
	// the secret (real SES never sees the secret; a proxy might echo it).
	fail := sesError(403, "UnrecognizedClientException",
		"The security token included in the request is invalid: "+sesTestKeyID+" / "+sesTestSecret)
	apiLeakTest(t, []string{sesTestKeyID, sesTestSecret}, fail, func(url string, log *slog.Logger, timeout time.Duration) Upstream {
		u, err := newSES(Config{Name: "ses-leak", Type: "ses", Region: "eu-west-1", AccessKeyID: sesTestKeyID,
			SecretAccessKey: sesTestSecret, Endpoint: url, Timeout: timeout}, Deps{Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		return u
	})
}

// Without access_key_id the default AWS credential chain is used; here it
// resolves from the environment, never from a real AWS endpoint.
func TestSES_DefaultCredentialChain(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENVIRONMENT1")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_ENDPOINT_URL", "")
	t.Setenv("AWS_ENDPOINT_URL_SESV2", "")
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("ses-env") })
	u := newTestSES(t, f.URL, func(c *Config) { c.AccessKeyID, c.SecretAccessKey, c.Region = "", "", "eu-central-1" })
	if _, err := u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})); err != nil {
		t.Fatalf("Send: %v", err)
	}
	if a := f.Requests()[0].Header.Get("Authorization"); !strings.Contains(a, "Credential=AKIDFROMENVIRONMENT1/") ||
		!strings.Contains(a, "/eu-central-1/ses/") {
		t.Errorf("Authorization = %q, want the key from the environment and region eu-central-1", a)
	}
}

// IRSA: the default chain gets credentials from STS with a web identity
// token before SES is called. STS's answers are not SES's: a 400
// InvalidIdentityToken (no OIDC provider for the cluster, a common
// misconfiguration) is this upstream's fault, not a rejected message that
// would be dead-lettered without failover; an STS that does not answer is
// transient, not an ambiguous send pinned to SES; a 503 is transient.
func TestSES_CredentialFailuresAreNotSESAnswers(t *testing.T) {
	for _, tc := range []struct {
		name    string
		sts     http.HandlerFunc
		timeout time.Duration
		want    Class
	}{
		{"InvalidIdentityToken", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/xml")
			w.WriteHeader(400)
			io.WriteString(w, `<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>`+
				`<Code>InvalidIdentityToken</Code><Message>No OpenIDConnect provider found in your account for https://oidc.example</Message>`+
				`</Error><RequestId>r-1</RequestId></ErrorResponse>`)
		}, 30 * time.Second, ProviderFault}, // the SDK retries it for a few seconds (OIDC's eventual consistency)
		{"unavailable", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/xml")
			w.WriteHeader(503)
			io.WriteString(w, `<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code><Message>try again</Message></Error></ErrorResponse>`)
		}, 30 * time.Second, Transient},
		{"IDPCommunicationError", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/xml")
			w.WriteHeader(400)
			io.WriteString(w, `<ErrorResponse><Error><Type>Sender</Type><Code>IDPCommunicationError</Code><Message>the identity provider could not be reached</Message></Error></ErrorResponse>`)
		}, 30 * time.Second, Transient},
		{"silent", func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body) // the whole request is read, and never answered
			<-r.Context().Done()
		}, time.Second, Transient},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sts := httptest.NewServer(tc.sts)
			defer sts.Close()
			defer sts.CloseClientConnections()
			dir := t.TempDir()
			token := filepath.Join(dir, "token")
			os.WriteFile(token, []byte("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"), 0o600)
			for k, v := range map[string]string{
				"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
				"AWS_CONFIG_FILE": filepath.Join(dir, "config"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "credentials"),
				"AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_SESV2": "",
				"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/relaycar", "AWS_WEB_IDENTITY_TOKEN_FILE": token,
				"AWS_ENDPOINT_URL_STS": sts.URL,
			} {
				t.Setenv(k, v)
			}
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("never") })
			u := newTestSES(t, f.URL, func(c *Config) {
				c.AccessKeyID, c.SecretAccessKey, c.Timeout = "", "", tc.timeout
			})
			_, err := u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			if e := apiClassOf(t, err); e.Class != tc.want || !strings.Contains(e.Reason, "AWS credentials") {
				t.Errorf("class %v, reason %q; want %v, saying it was the credentials", e.Class, e.Reason, tc.want)
			}
			if n := len(f.Requests()); n != 0 {
				t.Errorf("SES got %d requests", n)
			}
		})
	}
}

// A 30 MB attachment passes a 40 MiB max_message_bytes but not SES's limit,
// which counts the base64 form: fail over instead of being dead-lettered.
func TestSES_TooBigAfterBase64IsUnsupported(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("never") })
	m := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
	m.Body = BytesBody(append(bodyOf(m), bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"), 420_000)...)) // 74 bytes a line: 31 MB
	_, err := newTestSES(t, f.URL).Send(context.Background(), m)
	if e := apiClassOf(t, err); e.Class != Unsupported || e.Code != "size" {
		t.Errorf("class/code = %v/%s, want unsupported/size (%v)", e.Class, e.Code, err)
	}
	if len(f.Requests()) != 0 {
		t.Error("the API was called")
	}
}

// The SDK's own input check fails before any request for a message that
// cannot be a SendEmail call; that says nothing about SES's health, so it
// must not count against the breaker (it used to be transient).
func TestSES_SDKInputCheckIsUnsupported(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("never") })
	m := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
	m.Body = BytesBody(nil)
	_, err := newTestSES(t, f.URL).Send(context.Background(), m)
	if e := apiClassOf(t, err); e.Class != Unsupported {
		t.Errorf("class = %v, want unsupported (%v)", e.Class, err)
	}
	if len(f.Requests()) != 0 {
		t.Error("the API was called")
	}
}

// sesSigned is what the streaming fake saw of one SendEmail request.
type sesSigned struct {
	contentLength, header, received int64
	chunked                         bool
	auth, resigned, tampered        string
	req                             sesRequest
	jsonErr                         error
}

// sesResign signs a copy of r with the SHA-256 of body, as the SDK would
// have had it sent body: the same Authorization means the signature, and
// so SES's check of the payload, covers the bytes that arrived.
func sesResign(t *testing.T, r *http.Request, body []byte) string {
	t.Helper()
	auth := r.Header.Get("Authorization")
	_, signed, _ := strings.Cut(auth, "SignedHeaders=")
	signed, _, _ = strings.Cut(signed, ",")
	date, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		t.Errorf("X-Amz-Date: %v", err)
		return ""
	}
	cp, err := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), nil)
	if err != nil {
		t.Error(err)
		return ""
	}
	for _, h := range strings.Split(signed, ";") {
		if h != "host" && h != "content-length" {
			cp.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	cp.ContentLength = int64(len(body))
	sum := sha256.Sum256(body)
	creds := aws.Credentials{AccessKeyID: sesTestKeyID, SecretAccessKey: sesTestSecret}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, cp, hex.EncodeToString(sum[:]), "ses", "us-east-1", date); err != nil {
		t.Error(err)
		return ""
	}
	return cp.Header.Get("Authorization")
}

// The body goes out streamed from the spool: for each size modulo 3 (the
// base64 tail), Raw.Data decodes to the message byte for byte, in every
// recipient chunk, Content-Length is the length sent and the SigV4
// signature covers the streamed bytes.
func TestSES_StreamsTheBody(t *testing.T) {
	t.Parallel()
	for _, size := range []int{3_000_000, 3_000_001, 3_000_002} {
		t.Run(strconv.Itoa(size%3), func(t *testing.T) {
			t.Parallel()
			var mu sync.Mutex
			var got []sesSigned
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, err := io.ReadAll(r.Body)
				if err != nil {
					t.Errorf("reading the request: %v", err)
				}
				s := sesSigned{contentLength: r.ContentLength, received: int64(len(body)),
					chunked: len(r.TransferEncoding) > 0, auth: r.Header.Get("Authorization"),
					resigned: sesResign(t, r, body)}
				s.header, _ = strconv.ParseInt(r.Header.Get("Content-Length"), 10, 64)
				s.tampered = sesResign(t, r, append(bytes.Clone(body[:len(body)-2]), '!', '}'))
				s.jsonErr = json.Unmarshal(body, &s.req)
				mu.Lock()
				got = append(got, s)
				mu.Unlock()
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"MessageId":"ses-stream-%d"}`, len(got))
			}))
			t.Cleanup(srv.Close)

			rng := mrand.New(mrand.NewChaCha8([32]byte{byte(size)}))
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			// A file, as the spool serves it.
			path := filepath.Join(t.TempDir(), "msg")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			rcpts := apiRcpts(51)
			m := &Message{ID: "spool-big", From: "alice@example.com", To: rcpts, Body: io.NewSectionReader(f, 0, int64(size))}

			rc, err := newTestSES(t, srv.URL, func(c *Config) { c.ConfigurationSet = "relaycar-events" }).Send(context.Background(), m)
			if err != nil || len(rc.Refused) > 0 {
				t.Fatalf("Send: %v, refused %d", err, len(rc.Refused))
			}
			if rc.ProviderID != "ses-stream-1" {
				t.Errorf("ProviderID = %q, want the first call's", rc.ProviderID)
			}
			if len(got) != 2 {
				t.Fatalf("%d calls for 51 recipients, want 2", len(got))
			}
			for i, s := range got {
				if s.contentLength != s.received || s.header != s.received || s.chunked {
					t.Errorf("call %d: Content-Length %d (header %d, chunked %v), received %d bytes", i, s.contentLength, s.header, s.chunked, s.received)
				}
				if s.resigned == "" || s.resigned != s.auth {
					t.Errorf("call %d: the signature does not cover the received body:\n got %s\nwant %s", i, s.auth, s.resigned)
				}
				if s.tampered == s.auth {
					t.Errorf("call %d: re-signing another body gives the same signature: the check proves nothing", i)
				}
				if s.jsonErr != nil {
					t.Fatalf("call %d: the body is not JSON: %v", i, s.jsonErr)
				}
				if want := rcpts[50*i : min(50*i+50, len(rcpts))]; !slices.Equal(s.req.Destination.ToAddresses, want) {
					t.Errorf("call %d: ToAddresses = %d addresses, want %d", i, len(s.req.Destination.ToAddresses), len(want))
				}
				if s.req.FromEmailAddress != "alice@example.com" || s.req.ConfigurationSetName != "relaycar-events" {
					t.Errorf("call %d: FromEmailAddress %q, ConfigurationSetName %q", i, s.req.FromEmailAddress, s.req.ConfigurationSetName)
				}
				raw, err := base64.StdEncoding.DecodeString(s.req.Content.Raw.Data)
				if err != nil {
					t.Fatalf("call %d: Raw.Data is not base64: %v", i, err)
				}
				if !bytes.Equal(raw, data) {
					t.Errorf("call %d: Raw.Data decodes to %d bytes that differ from the %d of the message", i, len(raw), len(data))
				}
			}
		})
	}
}

// The SDK reads the stream, seeks back to the start, to the end and back;
// iotest checks reads of every size and seeks of every kind, at offsets
// inside a base64 group too.
func TestSESStream_ReadSeek(t *testing.T) {
	t.Parallel()
	rng := mrand.New(mrand.NewChaCha8([32]byte{7}))
	for _, size := range []int{1, 2, 3, 4, 5, 1000, sesStreamChunk - 1, sesStreamChunk, sesStreamChunk + 1, 3*sesStreamChunk + 2} {
		body := make([]byte, size)
		for i := range body {
			body[i] = byte(rng.Uint32())
		}
		prefix, suffix := []byte(`{"Content":{"Raw":{"Data":"`), []byte(`"}},"Destination":{"ToAddresses":["bob@example.net"]}}`)
		want := slices.Concat(prefix, []byte(base64.StdEncoding.EncodeToString(body)), suffix)
		s := newSESStream(prefix, suffix, BytesBody(body))
		if s.Size() != int64(len(want)) {
			t.Errorf("size %d: Size() = %d, want %d", size, s.Size(), len(want))
		}
		if err := iotest.TestReader(s, want); err != nil {
			t.Errorf("size %d: %v", size, err)
		}
	}
}

// errBody fails every read, as a spool file on a failing disk would.
type errBody struct{ size int64 }

func (b errBody) ReadAt([]byte, int64) (int, error) { return 0, errors.New("input/output error") }
func (b errBody) Size() int64                       { return b.size }

// A spool read error is transient, as when the message was read whole
// before the call, and no request goes out half-signed.
func TestSES_SpoolReadErrorIsTransient(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesOK("never") })
	m := apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"})
	m.Body = errBody{size: 1000}
	_, err := newTestSES(t, f.URL).Send(context.Background(), m)
	if e := apiClassOf(t, err); e.Class != Transient || !strings.Contains(e.Reason, "reading the spooled message") {
		t.Errorf("class = %v, reason %q: want transient, reading the spooled message", e.Class, e.Reason)
	}
	if len(f.Requests()) != 0 {
		t.Error("the API was called")
	}
}

// An SDK that stops carrying the placeholder would fail every message the
// same way: a provider fault (fail over, open the breaker), not a retry.
func TestSES_MissingPlaceholderIsProviderFault(t *testing.T) {
	s := &sesUpstream{name: "ses"}
	err := s.classify(context.Background(), fmt.Errorf("operation error SESv2: SendEmail, serialize: %w", errPlaceholder), &apiProgress{})
	if err.Class != ProviderFault {
		t.Errorf("class %s, want provider_fault: %v", err.Class, err)
	}
}
