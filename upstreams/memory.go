package upstreams

import (
	"context"
	"io"
)

// Memory is the process-wide budget that adapters holding a whole message
// in memory reserve from first, so that concurrent large deliveries wait
// their turn instead of growing the heap past the container's limit.
type Memory interface {
	Acquire(ctx context.Context, n int64) (release func(), err error)
}

// Bytes held per message byte by the adapters that cannot stream, as
// measured with allocation profiles of one send (tools/rss): the body
// itself plus what their encodings and SDKs copy on top of it.
const (
	// Mailgun and SES: none, their bodies stream from the spool
	// (mailgun_stream.go, ses_stream.go).
	memFactorSMTP2GO  = 4 // raw + copy with Bcc + base64 JSON: ~2.3x allocated
	memFactorSendGrid = 4 // parsed from the spool, base64 streamed: enmime's decoded parts, ~1.6x peak; a text attachment is re-parsed raw: ~3.6x
)

// reserve takes factor × m's size from mem (nil: no budget). The error is
// Transient: waiting for memory says nothing about the provider, and ends
// only when ctx does (shutdown, the attempt's timeout).
func reserve(ctx context.Context, mem Memory, upstream string, m *Message, factor int64) (func(), error) {
	if mem == nil {
		return func() {}, nil
	}
	release, err := mem.Acquire(ctx, factor*m.size())
	if err != nil {
		return nil, errorf(upstream, Transient, "", err, "waiting for memory to hold the message: %v", err)
	}
	return release, nil
}

// loadBody returns the whole body in memory after reserving factor × its
// size; release gives the memory back.
func loadBody(ctx context.Context, mem Memory, upstream string, m *Message, factor int64) (data []byte, release func(), err error) {
	if b, ok := m.Body.(bytesBody); ok {
		return b, func() {}, nil // already in memory
	}
	release, err = reserve(ctx, mem, upstream, m, factor)
	if err != nil {
		return nil, nil, err
	}
	data = make([]byte, m.size())
	if _, err := io.ReadFull(m.Reader(), data); err != nil {
		release()
		return nil, nil, errorf(upstream, Transient, "", err, "reading the spooled message: %v", err)
	}
	return data, release, nil
}
