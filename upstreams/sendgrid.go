package upstreams

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sendgrid/rest"
	"github.com/sendgrid/sendgrid-go"
	sgmail "github.com/sendgrid/sendgrid-go/helpers/mail"
)

// sendGridUpstream delivers through SendGrid's v3 Mail Send API. SendGrid takes no
// raw MIME, so each message is parsed and mapped onto the JSON schema. What
// the schema cannot carry faithfully (signed or encrypted mail, several text
// bodies, non-text alternatives, ...) is refused as Unsupported before any
// request, so the route can fail over to an upstream that sends raw bytes.
type sendGridUpstream struct {
	name    string
	key     Secret
	host    string
	timeout time.Duration
	client  *rest.Client
	log     *slog.Logger
	mem     Memory
	now     func() time.Time
	// maxBody is SendGrid's total size limit, checked on the JSON body so a
	// message that is too big fails over instead of being dead-lettered on 413.
	maxBody int
}

const (
	sendGridHost = "https://api.sendgrid.com"
	sendGridPath = "/v3/mail/send"
	// sendGridMaxRecipients is the documented limit of to+cc+bcc over all
	// personalizations of one request.
	sendGridMaxRecipients = 1000
	// sendGridMaxBytes is the documented "total email size including
	// attachments" limit.
	sendGridMaxBytes = 30 << 20
)

func newSendGrid(c Config, d Deps) (*sendGridUpstream, error) {
	host := strings.TrimRight(c.Endpoint, "/")
	if host == "" {
		host = sendGridHost
	}
	timeout := c.Timeout
	return &sendGridUpstream{
		name:    c.Name,
		key:     c.APIKey,
		host:    host,
		timeout: timeout,
		// sendgrid.DefaultClient has no timeout and MakeRequestRetry sleeps on
		// 429 by itself; the relay owns retries, so use a plain client.
		client:  &rest.Client{HTTPClient: d.httpClient(timeout)},
		log:     d.logger().With("upstream", c.Name),
		maxBody: sendGridMaxBytes,
		mem:     d.Memory,
		now:     d.now(),
	}, nil
}

// Name returns the configured name.
func (s *sendGridUpstream) Name() string { return s.name }

// Send maps m to one Mail Send request per 1,000 recipients and posts them
// in order. When a later request fails after earlier ones were accepted, the
// receipt refuses only the recipients not yet delivered.
func (s *sendGridUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	release, err := reserve(ctx, s.mem, s.name, m, memFactorSendGrid)
	if err != nil {
		return Receipt{}, err
	}
	defer release()
	base, parts, chunks, err := mapSendGrid(m)
	if err != nil {
		var me *sgMappingError
		if errors.As(err, &me) {
			// Its text is the reason, its class Unsupported.
			return Receipt{}, errorf(s.name, Unsupported, "", nil, "%s", err.Error())
		}
		return Receipt{}, errorf(s.name, Transient, "", err, "reading the spooled message: %v", err)
	}
	if len(chunks) > 1 {
		s.log.Debug("sendgrid request split", "msg_id", m.ID, "requests", len(chunks), "rcpt_count", len(m.To))
	}
	// Encode every request first: a size problem must show before anything
	// is sent.
	markers := sgMarkers(len(parts))
	for i, a := range base.Attachments {
		a.Content = markers[i]
	}
	bodies := make([]*sgStream, len(chunks))
	for i, ch := range chunks {
		req := *base
		req.Personalizations = []*sgmail.Personalization{ch.p}
		body, err := sgEncode(&req, markers, parts)
		if err != nil {
			return Receipt{}, s.encodeError(err)
		}
		if body.size > int64(s.maxBody) {
			return Receipt{}, errorf(s.name, Unsupported, "", nil, "request of %d bytes exceeds SendGrid's limit of %d", body.size, s.maxBody)
		}
		bodies[i] = body
	}
	var ids []string
	for i, body := range bodies {
		id, e := s.post(ctx, body)
		if e != nil {
			if i == 0 {
				return Receipt{}, e
			}
			var left []string
			for _, c := range chunks[i:] {
				left = append(left, c.rcpts...)
			}
			return Receipt{ProviderID: strings.Join(ids, ","), Refused: refuse(left, e)}, nil
		}
		if id != "" {
			ids = append(ids, id)
		}
	}
	return Receipt{ProviderID: strings.Join(ids, ",")}, nil
}

// post sends one request body and classifies the outcome. It returns the
// X-Message-Id of an accepted request.
//
// SendGrid's whole answer to an accepted request is the 202 status and
// the X-Message-Id header (the body is empty), so a 2xx with that header
// is recorded without reading the body: a proxy or fake that streams a
// body forever must not hold the worker or its memory. A 2xx without the
// id is not an answer SendGrid gives: Ambiguous, never delivered with an
// empty id. sendgrid/rest's BuildResponse is not used: it reads the whole
// body before anyone can look at the status.
func (s *sendGridUpstream) post(ctx context.Context, body *sgStream) (string, *Error) {
	ctx, cancel := context.WithTimeoutCause(ctx, s.timeout, apiTimeoutCause(s.timeout))
	defer cancel()

	ctx, progress := apiTrace(ctx)
	req := sendgrid.GetRequest(s.key.Reveal(), sendGridPath, s.host)
	req.Method = rest.Post
	// The SDK builds the request from the JSON's start (a non-empty body
	// gets its Content-Type); the streamed body replaces it.
	req.Body = body.segs[0]
	hreq, err := rest.BuildRequestObject(req)
	if err != nil {
		// The URL was checked in newSendGrid; nothing else can fail here.
		return "", &Error{Upstream: s.name, Class: ProviderFault, Reason: "endpoint: cannot build the request"}
	}
	hreq.GetBody = func() (io.ReadCloser, error) { return body.reader(), nil }
	hreq.Body, hreq.ContentLength = body.reader(), body.size
	resp, err := s.client.HTTPClient.Do(hreq.WithContext(ctx))
	if err != nil {
		return "", apiTransportError(ctx, s.name, err, progress, s.key)
	}
	code := resp.StatusCode
	if code >= 200 && code < 300 {
		id := resp.Header.Get("X-Message-Id")
		if id != "" {
			// Closing an unread body drops the connection rather than
			// reading on; SendGrid's own empty body keeps it reusable.
			resp.Body.Close()
			return id, nil
		}
		defer apiDrainClose(resp.Body)
		raw, rerr := io.ReadAll(resp.Body)
		reason := "success without X-Message-Id"
		if rerr != nil {
			reason += "; " + apiUnreadable(rerr)
		} else if b := apiBodyReason(raw, s.key); b != "" {
			reason += ": " + b
		}
		return "", &Error{Upstream: s.name, Class: Ambiguous, Code: strconv.Itoa(code), Reason: truncate(reason, 300)}
	}
	defer apiDrainClose(resp.Body)
	raw, rerr := io.ReadAll(resp.Body)
	if rerr != nil {
		// The status is the answer; a body that does not read is only a
		// reason lost.
		raw = []byte(apiUnreadable(rerr))
	}
	return "", s.statusError(&rest.Response{StatusCode: code, Body: string(raw), Headers: resp.Header})
}

// sendGridErrors is SendGrid's error body.
type sendGridErrors struct {
	Errors []struct {
		Message string `json:"message"`
		Field   any    `json:"field"`
	} `json:"errors"`
}

// statusError classifies a non-2xx answer. 403 is a sender problem only when
// SendGrid says the from address is not a verified identity; other 403s
// (key scope, account blocked) are the account's.
func (s *sendGridUpstream) statusError(resp *rest.Response) *Error {
	code := resp.StatusCode
	var msgs []string
	senderIssue := false
	var eb sendGridErrors
	if json.Unmarshal([]byte(resp.Body), &eb) == nil && len(eb.Errors) > 0 {
		for _, e := range eb.Errors {
			field, _ := e.Field.(string)
			msg := oneLine(e.Message)
			if msg != "" && field != "" && field != "null" {
				msg += " [" + field + "]"
			}
			if msg != "" {
				msgs = append(msgs, msg)
			}
			lm := strings.ToLower(e.Message)
			if strings.EqualFold(field, "from") || strings.HasPrefix(strings.ToLower(field), "from.") ||
				strings.Contains(lm, "verified sender identity") ||
				strings.Contains(lm, "from address does not match a verified") {
				senderIssue = true
			}
		}
	} else if b := oneLine(resp.Body); b != "" {
		msgs = append(msgs, b)
	}
	reason := strings.Join(msgs, "; ")
	if reason == "" {
		reason = http.StatusText(code)
	}

	var class Class
	switch {
	case code == http.StatusUnauthorized:
		class = ProviderFault
	case code == http.StatusForbidden:
		class = ProviderFault
		if senderIssue {
			class = SenderRejected
		}
	case code == http.StatusBadRequest:
		class = Rejected
	case code == http.StatusRequestEntityTooLarge:
		// Too big for SendGrid, not a bad message: another upstream may
		// carry it (the request-size check in Send is the same class).
		class = Unsupported
	case code == http.StatusTooManyRequests:
		class = Transient
		if reset := http.Header(resp.Headers).Get("X-RateLimit-Reset"); reset != "" {
			if sec, err := strconv.ParseInt(strings.TrimSpace(reset), 10, 64); err == nil {
				reason = "rate limited until " + time.Unix(sec, 0).UTC().Format(time.RFC3339) + ": " + reason
			}
		}
	case code >= 500:
		class = Transient
	default:
		class = classifyHTTP(code)
	}
	// A proxy or a misbehaving server may echo the Authorization header.
	e := &Error{Upstream: s.name, Class: class, Code: strconv.Itoa(code), Reason: truncate(apiRedact(reason, s.key), 300)}
	// SendGrid refuses every request until X-RateLimit-Reset (Unix
	// seconds): asking sooner only burns requests.
	e.RetryAt = httpRetryAt(code, http.Header(resp.Headers), s.now())
	return e
}

var _ Upstream = (*sendGridUpstream)(nil)

// encodeError classes a failure to build the request: a request without
// its placeholders is an SDK change that fails every message (as for SES
// and Mailgun), anything else is this message.
func (s *sendGridUpstream) encodeError(err error) *Error {
	if errors.Is(err, errPlaceholder) {
		return errorf(s.name, ProviderFault, "", err, "encode request: %v", err)
	}
	return errorf(s.name, Unsupported, "", err, "encode request: %v", err)
}
