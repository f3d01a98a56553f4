package upstreams

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptrace"
	"net/url"
	"slices"
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
}

// apiTrace returns ctx with an httptrace hook that fills the returned
// progress. It composes with traces already in ctx (SDKs add their own).
func apiTrace(ctx context.Context) (context.Context, *apiProgress) {
	p := &apiProgress{}
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		// Each request starts by getting a connection. Resetting here makes
		// the progress describe the last request, the provider call, not
		// an earlier one in the same operation (SDK credential fetches
		// from STS or the instance metadata service).
		GetConn: func(string) {
			p.wrote.Store(false)
			p.reply.Store(false)
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
// ContextClass must still see a deadline.
func apiTimeoutCause(d time.Duration) error {
	return fmt.Errorf("configured timeout reached (%s): %w", d, context.DeadlineExceeded)
}

// apiTransportError classifies an error that came without an HTTP status:
// Transient when the request may not have reached the provider, Ambiguous
// when it was fully written and then timed out or lost its connection.
// The reason never quotes the request URL (url.Error does), only the cause.
func apiTransportError(ctx context.Context, upstream string, err error, p *apiProgress, secrets ...Secret) *Error {
	wrote := p != nil && p.wrote.Load()
	class := ContextClass(err, wrote)
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
	return &Error{Upstream: upstream, Class: class, Reason: Truncate(apiRedact(cause, secrets...), 300), Err: err}
}

// apiCheckEndpoint validates an `endpoint` override. The value is not
// echoed: an endpoint may carry proxy credentials.
func apiCheckEndpoint(endpoint string) error {
	if endpoint == "" {
		return nil
	}
	if u, err := url.Parse(endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("endpoint: must be an absolute http(s) URL")
	}
	return nil
}

// apiRedact removes every non-empty secret from s. Providers sometimes echo
// a bad key back in an error body; reasons end up in logs and the spool.
func apiRedact(s string, secrets ...Secret) string {
	for _, sec := range secrets {
		if v := sec.Reveal(); v != "" {
			s = strings.ReplaceAll(s, v, "<secret>")
		}
	}
	return s
}

// apiDrainClose reads what is left of a response body (bounded) and closes
// it, so the connection can be reused.
func apiDrainClose(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, 256<<10))
	_ = body.Close()
}

// apiBodyReason turns a provider's error body into a one-line reason.
func apiBodyReason(body []byte, secrets ...Secret) string {
	return Truncate(apiRedact(oneLine(string(body)), secrets...), 300)
}

// sendChunks calls send for consecutive chunks of at most size recipients
// (a provider's per-call limit) and returns the first call's id. When a
// later chunk fails, the error names the recipients not yet delivered, so
// the relay records the earlier chunks as delivered and never resends them.
func sendChunks(rcpts []string, size int, send func([]string) (string, *Error)) (string, error) {
	first := ""
	for i := 0; i < len(rcpts); i += size {
		id, err := send(rcpts[i:min(i+size, len(rcpts))])
		if err != nil {
			if i == 0 {
				return "", err
			}
			err.Recipients = slices.Clone(rcpts[i:])
			err.Delivered = first
			return first, err
		}
		if i == 0 {
			first = id
		}
	}
	return first, nil
}
