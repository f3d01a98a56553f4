package upstreams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/mailgun/mailgun-go/v5"
)

// mailgunUpstream sends raw MIME through Mailgun's messages.mime API, the
// body streamed from the spool (mailgun_stream.go). The envelope recipients
// go in the repeated `to` form fields, so Bcc works.
type mailgunUpstream struct {
	name    string
	domain  string
	client  *mailgun.Client
	timeout time.Duration
	key     Secret
	log     *slog.Logger
	now     func() time.Time
}

func newMailgun(c Config, d Deps) (*mailgunUpstream, error) {
	timeout := c.Timeout
	mg := mailgun.NewMailgun(c.APIKey.Reveal())
	// The SDK's default client is http.DefaultClient, without a timeout.
	hc := d.httpClient(timeout)
	hc.Transport = mailgunStreamTransport{base: hc.Transport}
	mg.SetHTTPClient(hc)
	base := mailgun.APIBase
	if c.Region == "eu" {
		base = mailgun.APIBaseEU
	}
	if c.Endpoint != "" {
		base = strings.TrimRight(c.Endpoint, "/")
	}
	if err := mg.SetAPIBase(base); err != nil {
		return nil, fmt.Errorf("endpoint: %v", err)
	}
	return &mailgunUpstream{name: c.Name, domain: c.Domain, client: mg, timeout: timeout, key: c.APIKey, log: d.logger(), now: d.now()}, nil
}

// Name returns the configured name.
func (g *mailgunUpstream) Name() string { return g.name }

// Send delivers m in calls of at most mailgun.MaxNumberOfRecipients and
// returns the first call's id. If a later call fails, the receipt refuses
// only the recipients not yet delivered.
func (g *mailgunUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	if len(m.To) == 0 {
		return Receipt{}, errorf(g.name, Rejected, "", nil, "no recipients")
	}
	rc, err := sendChunks(m.To, mailgun.MaxNumberOfRecipients, func(rcpts []string) (string, *Error) {
		return g.send(ctx, m, rcpts)
	})
	if err != nil || len(rc.Refused) > 0 {
		return rc, err
	}
	g.log.Debug("mailgun accepted message", "upstream", g.name, "msg_id", m.ID, "provider_id", rc.ProviderID, "rcpt_count", len(m.To))
	return rc, nil
}

// send makes one messages.mime call for rcpts.
func (g *mailgunUpstream) send(ctx context.Context, m *Message, rcpts []string) (string, *Error) {
	ctx, cancel := context.WithTimeoutCause(ctx, g.timeout, apiTimeoutCause(g.timeout))
	defer cancel()
	ctx, progress := apiTrace(ctx)
	// The SDK buffers the form it builds, so it gets a marker; the
	// transport streams m.Body from the spool in its place.
	ctx, marker := withMailgunStream(ctx, m.Body)
	msg := mailgun.NewMIMEMessage(g.domain, io.NopCloser(strings.NewReader(marker)), rcpts...)
	resp, err := g.client.Send(ctx, msg)
	if err != nil {
		return "", g.classify(ctx, err, progress)
	}
	if resp.ID == "" {
		return "", errorf(g.name, Ambiguous, "", nil, "Mailgun answered success without an id")
	}
	return resp.ID, nil
}

// classify maps an SDK error. Mailgun has no error codes beyond the status:
// 401/403 bad key or disabled domain, 404 unknown domain (the configured
// sending domain, so every message would fail: ProviderFault, not
// SenderRejected), 400 bad address, 413 too large (Unsupported: another
// upstream may carry it), 429/5xx transient; that is classifyHTTP. A 2xx other than 200/202/204, or one whose body does not
// parse, means the message was probably taken: Ambiguous.
func (g *mailgunUpstream) classify(ctx context.Context, err error, p *apiProgress) *Error {
	var ure *mailgun.UnexpectedResponseError
	if errors.As(err, &ure) {
		status := ure.Actual
		class := classifyHTTP(status)
		if status >= 200 && status < 300 {
			class = Ambiguous
		}
		reason := fmt.Sprintf("HTTP %d: %s", status, mailgunMessage(ure.Data))
		var rl *mailgun.RateLimitedError
		if errors.As(err, &rl) && rl.ResetAt != nil {
			reason += "; rate limit resets at " + rl.ResetAt.UTC().Format(time.RFC3339)
		}
		// err keeps only the status: the SDK's error quotes the whole body.
		// The SDK keeps the response headers, so Retry-After and
		// X-RateLimit-Reset (what RateLimitedError.ResetAt is read from)
		// are parsed as for every HTTP adapter.
		return &Error{Upstream: g.name, Class: class, Code: strconv.Itoa(status),
			Reason: truncate(apiRedact(reason, g.key), 300), err: fmt.Errorf("mailgun: HTTP %d", status),
			RetryAt: httpRetryAt(status, ure.Header, g.now())}
	}
	if p.reply.Load() {
		// A response came but its body did not read or parse. The SDK
		// drops the status then; the transport kept it. An error status
		// is still its own answer, a 2xx may mean Mailgun has the message.
		why := "unparseable body"
		if errors.Is(err, errResponseTooLarge) || errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			why = apiUnreadable(err)
		}
		if st := int(p.status.Load()); st != 0 && (st < 200 || st >= 300) {
			// The headers are lost with the body: a 429 pauses for the default.
			return &Error{Upstream: g.name, Class: classifyHTTP(st), Code: strconv.Itoa(st),
				Reason: fmt.Sprintf("HTTP %d: %s", st, why), err: fmt.Errorf("mailgun: HTTP %d", st),
				RetryAt: httpRetryAt(st, nil, g.now())}
		}
		return &Error{Upstream: g.name, Class: Ambiguous, Reason: "unreadable success response: " + why, err: err}
	}
	if errors.Is(err, mailgun.ErrInvalidMessage) {
		// The SDK's own check of the message (no body, no recipient):
		// a property of this message, not of Mailgun's health.
		return &Error{Upstream: g.name, Class: Unsupported, Reason: "Mailgun's SDK refused the message as invalid", err: err}
	}
	var ue *url.Error
	if p.wrote.Load() || errors.As(err, &ue) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return apiTransportError(ctx, g.name, err, p, g.key)
	}
	// Refused by the SDK before any request: a domain it considers invalid
	// or an empty key. Configuration, so every message would fail.
	return &Error{Upstream: g.name, Class: ProviderFault, Reason: truncate(apiRedact(oneLine(err.Error()), g.key), 300), err: err}
}

// mailgunMessage extracts {"message": ...} from an error body, or the body.
func mailgunMessage(body []byte) string {
	var v struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(body, &v) == nil && v.Message != "" {
		return oneLine(v.Message)
	}
	return oneLine(string(body))
}

var _ Upstream = (*mailgunUpstream)(nil)
