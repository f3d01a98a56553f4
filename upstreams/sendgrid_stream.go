package upstreams

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"

	sgmail "github.com/sendgrid/sendgrid-go/helpers/mail"
)

// Attachments would be held three more times as base64 strings in the
// SGMailV3, the JSON encoder's buffer and the request. Instead the encoder
// gets a random marker per attachment content, and the request body is the
// JSON around the markers with each attachment's base64 encoded as it is
// read. The bytes sent are the same as json.Encoder's.

// sgStream is one Mail Send request body.
type sgStream struct {
	segs  [][]byte // the JSON around the contents: len(parts)+1
	parts [][]byte // decoded attachment contents, shared by all requests
	size  int64
}

// sgMarkers returns n markers, random per call so that no message text can
// hold one. rand.Text is base32: JSON writes it unescaped.
func sgMarkers(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "relaycar-attachment-" + rand.Text()
	}
	return out
}

// sgEncode encodes req, whose attachment i has the content markers[i],
// into the body that carries parts[i] there instead.
func sgEncode(req *sgmail.SGMailV3, markers []string, parts [][]byte) (*sgStream, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // HTML bodies would grow by \u003c escapes
	if err := enc.Encode(req); err != nil {
		return nil, err
	}
	js := buf.Bytes()
	s := &sgStream{parts: parts}
	for i, mk := range markers {
		q := []byte(`"` + mk + `"`)
		at := placeholderAt(js, q)
		if at < 0 {
			return nil, fmt.Errorf("the Mail Send JSON: %w", errPlaceholder)
		}
		// Keep the quotes in the JSON: only the marker is replaced.
		s.segs = append(s.segs, js[:at+1])
		js = js[at+len(q)-1:]
		s.size += int64(at+1) + int64(base64.StdEncoding.EncodedLen(len(parts[i])))
	}
	s.segs = append(s.segs, js)
	s.size += int64(len(js))
	return s, nil
}

// reader returns the body from the start; each reader is independent, so
// the transport can resend.
func (s *sgStream) reader() io.ReadCloser {
	rs := make([]io.Reader, 0, 2*len(s.parts)+1)
	for i, p := range s.parts {
		rs = append(rs, bytes.NewReader(s.segs[i]), &sgBase64Reader{src: p})
	}
	rs = append(rs, bytes.NewReader(s.segs[len(s.parts)]))
	return io.NopCloser(io.MultiReader(rs...))
}

// sgBase64Reader reads the standard base64 of src, encoding 3-byte
// groups as asked for so no encoded copy exists.
type sgBase64Reader struct {
	src []byte
	buf [4 << 10]byte
	out []byte
}

func (r *sgBase64Reader) Read(p []byte) (int, error) {
	if len(r.out) == 0 {
		if len(r.src) == 0 {
			return 0, io.EOF
		}
		n := min(len(r.src), len(r.buf)/4*3)
		r.out = r.buf[:base64.StdEncoding.EncodedLen(n)]
		base64.StdEncoding.Encode(r.out, r.src[:n])
		r.src = r.src[n:]
	}
	n := copy(p, r.out)
	r.out = r.out[n:]
	return n, nil
}

// sgSource reads the spooled message for the mapping, several times if
// need be, and keeps the first read error: the spool failing is no reason
// to call the message unmappable.
type sgSource struct {
	body Body
	err  error
}

func (s *sgSource) reader() *bufio.Reader {
	return bufio.NewReaderSize(&sgSourceReader{s: s, r: io.NewSectionReader(s.body, 0, s.body.Size())}, 64<<10)
}

type sgSourceReader struct {
	s *sgSource
	r io.Reader
}

func (r *sgSourceReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF && r.s.err == nil {
		r.s.err = err
	}
	return n, err
}

// sgHeaderBlock reads the header section, through its empty line.
func sgHeaderBlock(r *bufio.Reader) []byte {
	var out []byte
	for {
		line, err := r.ReadBytes('\n')
		out = append(out, line...)
		if err != nil || string(line) == "\n" || string(line) == "\r\n" {
			return out
		}
	}
}
