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

// Size is the length of the message in bytes.
func (m *Message) Size() int64 { return m.Body.Size() }

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

// Upstream hands one message to a provider. It returns the provider's id for
// the message (may be empty) once the provider has accepted it; any error
// should be an *Error so the relay knows whether to fail over, retry or
// dead-letter.
type Upstream interface {
	Name() string
	Send(ctx context.Context, m *Message) (providerID string, err error)
}

// Closer is implemented by upstreams that hold connections or processes.
type Closer interface {
	Close() error
}

// Func adapts a function to an Upstream, so tests can script one in a line.
type Func struct {
	N string
	F func(ctx context.Context, m *Message) (string, error)
}

// Name returns the configured name.
func (f Func) Name() string { return f.N }

// Send calls F.
func (f Func) Send(ctx context.Context, m *Message) (string, error) { return f.F(ctx, m) }

var _ Upstream = Func{}
