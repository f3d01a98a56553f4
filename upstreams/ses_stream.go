package upstreams

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"

	"github.com/aws/aws-sdk-go-v2/service/sesv2"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// sesStreamChunk is the most raw bytes one Read takes from the body: 32 KiB
// of base64, the buffer size of io.Copy and of net/http's body copy.
const sesStreamChunk = 24 << 10

// sesMarker returns a fresh placeholder for Raw.Data and its base64 as the
// SDK writes it. Base32 characters are base64 ones, and 24 of them decode
// to 18 bytes with no padding, so the base64 is the text itself, which no
// JSON escaping changes.
func sesMarker() (data []byte, encoded string) {
	encoded = rand.Text()[:24]
	data, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		panic(err) // the alphabet is base64's: cannot happen
	}
	return data, encoded
}

// sesStreamOption makes one SendEmail call send body in the place of the
// placeholder whose base64 is marker. It runs right after the SDK's
// serializer, so every later step (the SigV4 payload hash, the signature
// over Content-Length, the send) sees the real document.
func sesStreamOption(body Body, marker string) func(*sesv2.Options) {
	mw := middleware.SerializeMiddlewareFunc("RelaycarSESStreamBody", func(ctx context.Context, in middleware.SerializeInput, next middleware.SerializeHandler) (middleware.SerializeOutput, middleware.Metadata, error) {
		req, ok := in.Request.(*smithyhttp.Request)
		if !ok {
			return middleware.SerializeOutput{}, middleware.Metadata{}, fmt.Errorf("unexpected transport type %T", in.Request)
		}
		var doc []byte
		if st := req.GetStream(); st != nil {
			var err error
			if doc, err = io.ReadAll(st); err != nil {
				return middleware.SerializeOutput{}, middleware.Metadata{}, err
			}
		}
		q := []byte(`"` + marker + `"`)
		i := placeholderAt(doc, q)
		if i < 0 {
			return middleware.SerializeOutput{}, middleware.Metadata{}, fmt.Errorf("the serialized SendEmail request: %w", errPlaceholder)
		}
		st := newSESStream(doc[:i+1], doc[i+len(q)-1:], body)
		sreq, err := req.SetStream(st)
		if err != nil {
			return middleware.SerializeOutput{}, middleware.Metadata{}, err
		}
		sreq.ContentLength = st.Size() // SetStream measured it too; the signature covers it
		in.Request = sreq
		return next.HandleSerialize(ctx, in)
	})
	return func(o *sesv2.Options) {
		o.APIOptions = append(o.APIOptions, func(s *middleware.Stack) error {
			return s.Serialize.Insert(mw, "OperationSerializer", middleware.After)
		})
	}
}

// sesStream is a SendEmail JSON document whose Raw.Data is encoded from the
// body while it is read, a piece at a time, so a send holds no copy of the
// message. The SDK reads it twice (the SigV4 payload hash, then the send),
// seeking back to the start in between and to the end to measure it; any
// position can be sought, since each 4 bytes of base64 come from 3 bytes
// at a known offset of the body.
type sesStream struct {
	prefix, suffix []byte // the document up to and from the Data string's contents
	body           Body
	encLen         int64  // base64 length of body
	off            int64  // read position in the document
	raw            []byte // one read's body bytes, reused
}

func newSESStream(prefix, suffix []byte, body Body) *sesStream {
	return &sesStream{prefix: prefix, suffix: suffix, body: body,
		encLen: int64(base64.StdEncoding.EncodedLen(int(body.Size())))}
}

// Size is the length of the whole document.
func (s *sesStream) Size() int64 { return int64(len(s.prefix)) + s.encLen + int64(len(s.suffix)) }

// Read reads from the part the position is in; a read never spans two
// parts, which io.Reader allows.
func (s *sesStream) Read(p []byte) (int, error) {
	pre := int64(len(s.prefix))
	var n int
	var err error
	switch off := s.off; {
	case len(p) == 0:
		return 0, nil
	case off >= s.Size():
		return 0, io.EOF
	case off < pre:
		n = copy(p, s.prefix[off:])
	case off < pre+s.encLen:
		n, err = s.readBase64(p, off-pre)
	default:
		n = copy(p, s.suffix[off-pre-s.encLen:])
	}
	s.off += int64(n)
	return n, err
}

// readBase64 reads the body's base64 from offset e of the encoding.
func (s *sesStream) readBase64(p []byte, e int64) (int, error) {
	group, skip := e/4, int(e%4)
	groups := int64(len(p) / 4)
	if skip != 0 || groups == 0 {
		groups = 1 // a group the read does not take whole: encoded aside
	}
	groups = min(groups, sesStreamChunk/3, s.encLen/4-group)
	from := 3 * group
	if s.raw == nil {
		s.raw = make([]byte, sesStreamChunk)
	}
	raw := s.raw[:min(3*groups, s.body.Size()-from)]
	if n, err := s.body.ReadAt(raw, from); n < len(raw) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, fmt.Errorf("reading the spooled message: %w", err)
	}
	if skip == 0 && len(p) >= 4 {
		base64.StdEncoding.Encode(p, raw)
		return base64.StdEncoding.EncodedLen(len(raw)), nil
	}
	var g [4]byte
	base64.StdEncoding.Encode(g[:], raw)
	return copy(p, g[skip:]), nil
}

// Seek sets the read position; the SDK uses offsets from the start, the
// current position and the end.
func (s *sesStream) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += s.off
	case io.SeekEnd:
		offset += s.Size()
	default:
		return 0, errors.New("sesStream.Seek: invalid whence")
	}
	if offset < 0 {
		return 0, errors.New("sesStream.Seek: negative position")
	}
	s.off = offset
	return offset, nil
}
