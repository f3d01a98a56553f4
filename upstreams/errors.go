package upstreams

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"
	"unicode/utf8"
)

// Class tells the relay what to do after a failed attempt. The String form is
// the `result` label of relaycar_deliveries_total.
type Class int

const (
	// Transient: try the next upstream now, retry later; counts against the breaker.
	Transient Class = iota
	// ProviderFault: the upstream is unusable (bad key, suspended account); its breaker opens at once.
	ProviderFault
	// SenderRejected: the upstream refuses this sender (unverified identity);
	// only the (upstream, sender domain) breaker opens.
	SenderRejected
	// Rejected: the message itself is bad; failing over would not help, so it is dead-lettered.
	Rejected
	// Ambiguous: the request was fully sent but no answer came back; the provider may have it.
	Ambiguous
	// Unsupported: this upstream cannot carry this message (e.g. signed mail
	// through an API without raw MIME); try the next upstream, does not count
	// against its breaker, and if no upstream of the route can carry it,
	// dead-letter.
	Unsupported
)

// Classes lists every class, for tests and metric pre-registration.
var Classes = []Class{Transient, ProviderFault, SenderRejected, Rejected, Ambiguous, Unsupported}

func (c Class) String() string {
	switch c {
	case Transient:
		return "transient"
	case ProviderFault:
		return "provider_fault"
	case SenderRejected:
		return "sender_rejected"
	case Rejected:
		return "rejected"
	case Ambiguous:
		return "ambiguous"
	case Unsupported:
		return "unsupported"
	}
	return "unknown"
}

// Error is a classified delivery failure. Reason is safe to log and store in
// the spool: adapters never put credentials or request URLs with keys in it.
type Error struct {
	Upstream string
	Class    Class
	// Code is the provider's code: an HTTP status, an SMTP reply code or an API error name.
	Code   string
	Reason string
	// RetryAt, when set, is when the provider asked to be called again
	// (429 Retry-After, SES throttling, SMTP 421 4.7.x): the relay pauses
	// the upstream until then and does not count the error against its
	// breaker.
	RetryAt time.Time
	err     error
}

func (e *Error) Error() string {
	s := e.Upstream + ": " + e.Class.String()
	if e.Code != "" {
		s += " (" + e.Code + ")"
	}
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s
}

func (e *Error) Unwrap() error { return e.err }

// LogValue keeps log lines to the classified fields; the wrapped error may
// carry transport detail that does not belong in an operator's log.
func (e *Error) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("upstream", e.Upstream),
		slog.String("class", e.Class.String()),
		slog.String("code", e.Code),
		slog.String("reason", e.Reason),
	)
}

// errorf builds an *Error with a formatted reason.
func errorf(upstream string, class Class, code string, err error, format string, args ...any) *Error {
	return &Error{Upstream: upstream, Class: class, Code: code, Reason: truncate(fmt.Sprintf(format, args...), 300), err: err}
}

// RetryAtOf returns err's RetryAt, zero if it has none.
func RetryAtOf(err error) time.Time {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAt
	}
	return time.Time{}
}

// ClassOf returns the class of err. Unclassified errors are Transient: calling
// a bad message transient costs a retry, calling a good one Rejected loses it.
func ClassOf(err error) Class {
	var e *Error
	if errors.As(err, &e) {
		return e.Class
	}
	return Transient
}

// classifyHTTP maps an HTTP status to a class for providers without a richer
// error code. Specific codes come before the generic 4xx bucket.
func classifyHTTP(status int) Class {
	switch {
	case status == http.StatusUnauthorized, status == http.StatusForbidden:
		return ProviderFault
	case status == http.StatusRequestTimeout, status == http.StatusTooManyRequests:
		return Transient
	case status == http.StatusRequestEntityTooLarge:
		// Too big for this provider, not a bad message: another upstream
		// of the route may carry it.
		return Unsupported
	case status == http.StatusBadRequest, status == http.StatusUnprocessableEntity:
		return Rejected
	case status >= 500:
		return Transient
	case status >= 400:
		// Other 4xx (404 unknown domain, 402 payment, 451 residency) are
		// account or configuration problems, not a bad message.
		return ProviderFault
	}
	return Transient
}

// contextClass classifies a transport error. A deadline, a cancellation
// (shutdown) or a broken connection after the whole request went out is
// Ambiguous: the provider may have accepted the message.
func contextClass(err error, requestSent bool) Class {
	if requestSent && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		isTimeout(err) || isConnReset(err)) {
		return Ambiguous
	}
	return Transient
}

// truncate shortens s to n runes so provider bodies never flood a log or
// spool file.
func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}
