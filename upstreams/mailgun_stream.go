package upstreams

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
)

// mailgun-go builds a request's whole multipart form in a bytes.Buffer
// (FormDataPayload.getPayloadBuffer): a large message would be held ~3x.
// So the SDK gets a short random marker as the message, and
// mailgunStreamTransport swaps it for the spooled body as the request goes
// out. The SDK still makes the URL, auth, headers and response errors.

// mailgunStreamKey is the context key of the call's *mailgunStream.
type mailgunStreamKey struct{}

// mailgunStream is the message of one messages.mime call and the marker
// standing in for it in the SDK's form.
type mailgunStream struct {
	marker []byte
	body   Body
}

// withMailgunStream returns ctx carrying body and the marker to give the
// SDK in its place. The marker is random per call, so it cannot appear in
// the rest of the form by accident.
func withMailgunStream(ctx context.Context, body Body) (context.Context, string) {
	s := &mailgunStream{marker: []byte("relaycar-message-" + rand.Text()), body: body}
	return context.WithValue(ctx, mailgunStreamKey{}, s), string(s.marker)
}

// mailgunStreamTransport replaces the marker in the body of a request
// whose context has a mailgunStream; other requests pass unchanged.
type mailgunStreamTransport struct {
	base http.RoundTripper
}

func (t mailgunStreamTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	s, _ := req.Context().Value(mailgunStreamKey{}).(*mailgunStream)
	if s == nil || req.Body == nil {
		return t.base.RoundTrip(req)
	}
	// The form is the SDK's buffer with the marker: small (the recipients).
	form, err := io.ReadAll(req.Body)
	req.Body.Close()
	if err != nil {
		return nil, err
	}
	i := placeholderAt(form, s.marker)
	if i < 0 {
		return nil, fmt.Errorf("mailgun-go's form: %w", errPlaceholder)
	}
	pre, post := form[:i], form[i+len(s.marker):]
	size := s.body.Size()
	out := req.Clone(req.Context())
	// GetBody lets the transport resend (HTTP/2 retries, a dead idle
	// connection): every read of the spool is independent.
	out.GetBody = func() (io.ReadCloser, error) {
		return io.NopCloser(io.MultiReader(bytes.NewReader(pre), io.NewSectionReader(s.body, 0, size), bytes.NewReader(post))), nil
	}
	out.Body, _ = out.GetBody()
	out.ContentLength = int64(len(pre)) + size + int64(len(post))
	return t.base.RoundTrip(out)
}
