package upstreams

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"regexp"
	"strings"
	"sync/atomic"
	"time"
)

// Helpers shared by the HTTP API adapters (ses, mailgun, smtp2go).

// apiProgress records how far one HTTP exchange got, so a failure can be
// classified: nothing written is safe to send elsewhere, a fully written
// request without an answer may have been accepted (Ambiguous).
type apiProgress struct {
	wrote atomic.Bool // the whole request, body included, went out
	reply atomic.Bool // the first byte of a response came back
	// status is the HTTP status of the last response (0 before one), set
	// by apiLimitTransport: SDKs drop it when the body fails to read, and
	// a 5xx with an unreadable body is still a 5xx, not "maybe accepted".
	status atomic.Int32
}

// apiProgressKey finds the progress of an exchange from its request.
type apiProgressKey struct{}

// apiTrace returns ctx with an httptrace hook that fills the returned
// progress. It composes with traces already in ctx (SDKs add their own).
func apiTrace(ctx context.Context) (context.Context, *apiProgress) {
	p := &apiProgress{}
	ctx = context.WithValue(ctx, apiProgressKey{}, p)
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		// Each request starts by getting a connection. Resetting here makes
		// the progress describe the last request, the provider call, not
		// an earlier one in the same operation (SDK credential fetches
		// from STS or the instance metadata service).
		GetConn: func(string) {
			p.wrote.Store(false)
			p.reply.Store(false)
			p.status.Store(0)
		},
		WroteRequest: func(i httptrace.WroteRequestInfo) {
			if i.Err == nil {
				p.wrote.Store(true)
			}
		},
		GotFirstResponseByte: func() { p.reply.Store(true) },
	}), p
}

// apiTimeoutCause is the context cause for an adapter's own timeout. It
// wraps context.DeadlineExceeded: net/http returns the cause, and
// contextClass must still see a deadline.
func apiTimeoutCause(d time.Duration) error {
	return fmt.Errorf("configured timeout reached (%s): %w", d, context.DeadlineExceeded)
}

// apiTransportError classifies an error that came without an HTTP status:
// Transient when the request may not have reached the provider, Ambiguous
// when it was fully written and then timed out or lost its connection.
// The reason never quotes the request URL (url.Error does), only the cause.
func apiTransportError(ctx context.Context, upstream string, err error, p *apiProgress, secrets ...Secret) *Error {
	if errors.Is(err, errPlaceholder) {
		return &Error{Upstream: upstream, Class: ProviderFault, Reason: errPlaceholder.Error(), err: err}
	}
	wrote := p != nil && p.wrote.Load()
	class := contextClass(err, wrote)
	var cause string
	switch {
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		cause = "timeout"
		// apiTimeoutCause says which timeout and how long.
		if c := context.Cause(ctx); c != nil && c != context.DeadlineExceeded && !errors.Is(c, context.Canceled) {
			cause = strings.TrimSuffix(c.Error(), ": "+context.DeadlineExceeded.Error())
		}
	case errors.Is(err, context.Canceled):
		cause = "canceled"
	default:
		inner := err
		var ue *url.Error
		if errors.As(err, &ue) {
			inner = ue.Err
		}
		cause = oneLine(inner.Error())
	}
	if wrote {
		cause = "after request was sent: " + cause
	}
	return &Error{Upstream: upstream, Class: class, Reason: truncate(apiRedact(cause, secrets...), 300), err: err}
}

// apiMinSecretLen is the shortest configured secret that apiRedact
// replaces wherever its value occurs. Shorter ones (possible only when an
// adapter is built without Config.Validate, which refuses them for API
// providers) would match ordinary words: a secret "s" turned every "s" of
// an error into "<secret>". Such secrets are still removed where they are
// embedded (auth headers, URLs, key fields).
const apiMinSecretLen = 12

// apiSecretSpots are the places credentials sit in text a provider or
// proxy may echo back, whatever the credential's value; each match
// becomes repl.
var apiSecretSpots = []struct {
	re   *regexp.Regexp
	repl string
}{
	// Authorization headers (also in JSON dumps): the whole value, which
	// for SigV4 includes the access key ID.
	{regexp.MustCompile(`(?i)(\bauthorization["']?\s*[:=]\s*["']?)[^"'\r\n]+`), "${1}<secret>"},
	// Headers and fields that carry a key itself.
	{regexp.MustCompile(`(?i)(\b(?:x-smtp2go-api-key|x-api-key|api-key|x-amz-security-token)["']?\s*[:=]\s*["']?)[^\s"',;&]+`), "${1}<secret>"},
	// JSON fields of a request echoed back (SMTP2GO's "api_key").
	{regexp.MustCompile(`(?i)("(?:api_?key|api-key|key|password|secret|secret_access_key|access_key_id|token|access_token|session_token|authorization)"\s*:\s*")(?:[^"\\]|\\.)*`), "${1}<secret>"},
	// Query strings and form fields, and SigV4's Credential=/Signature=.
	{regexp.MustCompile(`(?i)((?:^|[?&;,\s])(?:api_?key|key|access_token|token|password|secret|signature|credential|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s"',;]+`), "${1}<secret>"},
	// URL userinfo: scheme://user:password@host.
	{regexp.MustCompile(`(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@"']+@`), "${1}<secret>@"},
	// Basic credentials without their header name.
	{regexp.MustCompile(`(?i)(\bbasic\s+)[A-Za-z0-9+/]{20,}={0,2}`), "${1}<secret>"},
}

// apiBearerRE finds bearer tokens echoed without their header name.
var apiBearerRE = regexp.MustCompile(`(?i)\b(bearer\s+)([A-Za-z0-9._~+/=-]{8,})`)

// redactCut is s on one line, redacted, then cut to n bytes: cut first,
// a secret across the cut would lose the tail that makes it match.
func redactCut(s string, n int, secrets ...Secret) string {
	return truncate(apiRedact(oneLine(s), secrets...), n)
}

// apiRedact removes credentials from text that came back from a provider
// (an error body, a transport error). Providers and proxies sometimes
// echo a bad key; reasons end up in logs and the spool. It redacts where
// credentials are embedded, and the configured secrets themselves where
// they are long enough that a match cannot be ordinary text; it never
// replaces arbitrary short substrings.
func apiRedact(s string, secrets ...Secret) string {
	for _, sec := range secrets {
		if v := sec.Reveal(); len(v) >= apiMinSecretLen {
			s = strings.ReplaceAll(s, v, "<secret>")
		}
	}
	for _, spot := range apiSecretSpots {
		s = spot.re.ReplaceAllString(s, spot.repl)
	}
	// "Bearer" followed by a plain word ("bearer authentication") is
	// prose; a token has a digit or punctuation in it.
	return apiBearerRE.ReplaceAllStringFunc(s, func(m string) string {
		sub := apiBearerRE.FindStringSubmatch(m)
		if strings.IndexFunc(sub[2], func(r rune) bool { return r < 'A' || r > 'Z' && r < 'a' || r > 'z' }) < 0 {
			return m
		}
		return sub[1] + "<secret>"
	})
}

// apiMaxResponseBytes bounds every provider response body. Success answers
// are a few hundred bytes and error pages a few KiB; an endless or huge
// body (a broken proxy, a hostile endpoint) must not be read into memory.
const apiMaxResponseBytes = 256 << 10

// errResponseTooLarge ends a read past apiMaxResponseBytes. It is an error,
// not io.EOF, so a truncated body never parses as a complete answer.
var errResponseTooLarge = fmt.Errorf("response body exceeds %d KiB", apiMaxResponseBytes>>10)

// apiLimitTransport bounds every response body of an adapter's client and
// records the status in the exchange's apiProgress. It wraps the transport
// rather than each read, so SDKs that read bodies themselves (the SES
// deserializer, mailgun-go, sendgrid/rest) are bounded too.
type apiLimitTransport struct {
	base http.RoundTripper
	max  int64
}

func (t apiLimitTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp == nil {
		return resp, err
	}
	if p, _ := req.Context().Value(apiProgressKey{}).(*apiProgress); p != nil {
		p.status.Store(int32(resp.StatusCode))
	}
	if resp.Body != nil {
		resp.Body = &apiLimitedBody{rc: resp.Body, left: t.max}
	}
	return resp, nil
}

// apiLimitedBody reads at most left bytes, then fails with
// errResponseTooLarge if the body goes on (and EOF if it ends exactly).
type apiLimitedBody struct {
	rc   io.ReadCloser
	left int64
	err  error
}

func (b *apiLimitedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1] // one byte more tells "ends here" from "goes on"
	}
	n, err := b.rc.Read(p)
	if int64(n) <= b.left {
		b.left -= int64(n)
		return n, err
	}
	n, b.left, b.err = int(b.left), 0, errResponseTooLarge
	return n, b.err
}

func (b *apiLimitedBody) Close() error { return b.rc.Close() }

// apiUnreadable describes why a response body could not be used.
func apiUnreadable(err error) string {
	if errors.Is(err, errResponseTooLarge) {
		return "response body exceeds " + fmt.Sprint(apiMaxResponseBytes>>10) + " KiB"
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return "timeout reading the response body"
	}
	return "response body unreadable"
}

// apiDrainClose reads what is left of a response body (bounded) and closes
// it, so the connection can be reused.
func apiDrainClose(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, 256<<10))
	_ = body.Close()
}

// apiBodyReason turns a provider's error body into a one-line reason.
func apiBodyReason(body []byte, secrets ...Secret) string {
	return redactCut(string(body), 300, secrets...)
}

// sendChunks calls send for consecutive chunks of at most size recipients
// (a provider's per-call limit) and returns the first call's id. When a
// later chunk fails, the receipt refuses the recipients not yet delivered,
// so the relay records the earlier chunks as delivered and never resends
// them.
func sendChunks(rcpts []string, size int, send func([]string) (string, *Error)) (Receipt, error) {
	var rc Receipt
	for i := 0; i < len(rcpts); i += size {
		id, err := send(rcpts[i:min(i+size, len(rcpts))])
		if err != nil {
			if i == 0 {
				return Receipt{}, err
			}
			rc.Refused = refuse(rcpts[i:], err)
			return rc, nil
		}
		if i == 0 {
			rc.ProviderID = id
		}
	}
	return rc, nil
}

// errPlaceholder means a request an SDK built around a placeholder for the
// message (Mailgun, SES, SendGrid) does not carry it exactly once: an SDK
// change, so every message would fail the same way.
var errPlaceholder = errors.New("the SDK's request does not carry the message placeholder exactly once")

// placeholderAt is where ph is in doc, or -1 unless it is there exactly
// once (then callers fail with errPlaceholder).
func placeholderAt(doc, ph []byte) int {
	i := bytes.Index(doc, ph)
	if i < 0 || bytes.Contains(doc[i+len(ph):], ph) {
		return -1
	}
	return i
}
