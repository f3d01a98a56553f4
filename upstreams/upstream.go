package upstreams

import (
	"bytes"
	"context"
	"io"
	"strings"
)

// Message is one delivery unit: the prepared bytes plus the envelope
// recipients of one route. The bytes already carry the stable Message-ID,
// the Received trace and no X-Relay-* headers, so adapters send them as-is.
type Message struct {
	// ID is the spool id; adapters may use it to name files or log lines.
	ID string
	// From is the envelope sender (MAIL FROM); empty for the null sender.
	From string
	// To are the envelope recipients this upstream must deliver to.
	To []string
	// AllRcpts are all envelope recipients of the message, across routes
	// and attempts; adapters that cannot restrict delivery to To use it to
	// avoid mailing someone twice.
	AllRcpts []string
	// Body is the RFC 5322 message with CRLF line endings, where it rests
	// (the spool file): adapters that can stream read it in pieces, the
	// others load it whole after reserving memory (see loadBody).
	Body Body
	// MessageID is the Message-ID header value, with angle brackets.
	MessageID string
}

// Body is random access to a message's bytes. Each read is independent, so
// one body serves failover and recipient chunks without rewinding.
type Body interface {
	io.ReaderAt
	Size() int64
}

// BytesBody is a Body held in memory (tests, small messages).
func BytesBody(b []byte) Body { return bytesBody(b) }

type bytesBody []byte

func (b bytesBody) ReadAt(p []byte, off int64) (int, error) { return bytes.NewReader(b).ReadAt(p, off) }
func (b bytesBody) Size() int64                             { return int64(len(b)) }

// size is the length of the message in bytes.
func (m *Message) size() int64 { return m.Body.Size() }

// Reader reads the whole message from the start.
func (m *Message) Reader() io.Reader { return io.NewSectionReader(m.Body, 0, m.Body.Size()) }

// SenderDomain returns the lower-cased domain of the envelope sender.
func (m *Message) SenderDomain() string { return Domain(m.From) }

// Domain returns the lower-cased domain part of an address, "" if none.
func Domain(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	return strings.ToLower(addr[i+1:])
}

// Upstream hands one message to a provider. Any error should be an *Error
// so the relay knows whether to fail over, retry or dead-letter. A non-nil
// error means nothing was delivered; it never comes with a delivery. A
// partial delivery returns a Receipt with ProviderID and Refused, and a nil
// error.
type Upstream interface {
	Name() string
	Send(ctx context.Context, m *Message) (Receipt, error)
}

// Receipt is what a provider accepted. One value for "delivered" keeps a
// partial delivery from reading as both a failure and a success.
type Receipt struct {
	// ProviderID is the provider's id for the message (may be empty).
	ProviderID string
	// Refused are the recipients of m.To that were not delivered, on a
	// partial delivery; every other recipient was.
	Refused []Refusal
}

// Refusal is one recipient a partial delivery did not reach. Err (never
// nil) is classified as a failed Send would be, so the relay treats the
// recipient as it would after one.
type Refusal struct {
	Rcpt string
	Err  *Error
}

// refuse refuses every one of rcpts with the same error.
func refuse(rcpts []string, e *Error) []Refusal {
	rs := make([]Refusal, len(rcpts))
	for i, r := range rcpts {
		rs[i] = Refusal{Rcpt: r, Err: e}
	}
	return rs
}

// RefusedRcpts returns the refused recipients, in order.
func (r Receipt) RefusedRcpts() []string {
	out := make([]string, len(r.Refused))
	for i, f := range r.Refused {
		out[i] = f.Rcpt
	}
	return out
}

// Worst returns the refusal error that decides for all refused recipients
// where one decision covers them (a breaker count, pinning an upstream),
// nil if none was refused. Ambiguous comes first: failing over may deliver
// twice; then the classes that count against a breaker; Unsupported last.
func (r Receipt) Worst() *Error {
	rank := func(c Class) int {
		switch c {
		case Ambiguous:
			return 0
		case ProviderFault:
			return 1
		case Transient:
			return 2
		case SenderRejected:
			return 3
		case Rejected:
			return 4
		}
		return 5
	}
	var w *Error
	for _, f := range r.Refused {
		if f.Err != nil && (w == nil || rank(f.Err.Class) < rank(w.Class)) {
			w = f.Err
		}
	}
	return w
}

// Closer is implemented by upstreams that hold connections or processes.
type Closer interface {
	Close() error
}

// Func adapts a function to an Upstream, so tests can script one in a line.
type Func struct {
	N string
	F func(ctx context.Context, m *Message) (Receipt, error)
}

// Name returns the configured name.
func (f Func) Name() string { return f.N }

// Send calls F.
func (f Func) Send(ctx context.Context, m *Message) (Receipt, error) { return f.F(ctx, m) }

var _ Upstream = Func{}
