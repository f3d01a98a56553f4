package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	sgmail "github.com/sendgrid/sendgrid-go/helpers/mail"
)

// sgStreamRequest is one request as the streaming fake received it.
type sgStreamRequest struct {
	body          []byte
	contentLength int64
	chunked       bool
	req           sgWire
}

// newSGStreamFake is a POST /v3/mail/send that decodes every request.
func newSGStreamFake(t *testing.T) (url string, got func() []sgStreamRequest) {
	t.Helper()
	var mu sync.Mutex
	var reqs []sgStreamRequest
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || r.Method != http.MethodPost || r.URL.Path != "/v3/mail/send" ||
			r.Header.Get("Authorization") != "Bearer "+sgTestKey || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, `{"errors":[{"message":"bad request"}]}`, http.StatusBadRequest)
			return
		}
		rec := sgStreamRequest{body: body, contentLength: r.ContentLength, chunked: len(r.TransferEncoding) > 0}
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rec.req); err != nil {
			http.Error(w, `{"errors":[{"message":"bad json"}]}`, http.StatusBadRequest)
			return
		}
		mu.Lock()
		reqs = append(reqs, rec)
		n := len(reqs)
		mu.Unlock()
		w.Header().Set("X-Message-Id", fmt.Sprintf("stream-%d", n))
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func() []sgStreamRequest {
		mu.Lock()
		defer mu.Unlock()
		return append([]sgStreamRequest(nil), reqs...)
	}
}

// sgBigMessage builds a message with a text and an HTML body and one
// base64 attachment of random bytes per size.
func sgBigMessage(rcpts []string, to string, sizes ...int) (*Message, [][]byte) {
	rng := rand.NewChaCha8([32]byte{'s', 'g'})
	var b strings.Builder
	fmt.Fprintf(&b, "From: \"A <&> B\" <a@example.com>\r\nTo: %s\r\nSubject: big \u00fcber <&>\r\nX-Note: \"quoted\" \\ back\r\n"+
		"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n", to)
	b.WriteString("--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n" +
		"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\u00fc\u00dfe \"x\" \\ \t tab\r\n" +
		"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hi &amp; \u2028 <b>there</b></p>\r\n--b2--\r\n")
	var want [][]byte
	for i, n := range sizes {
		raw := make([]byte, n)
		rng.Read(raw)
		want = append(want, raw)
		fmt.Fprintf(&b, "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"+
			"Content-Disposition: attachment; filename=\"part%d.bin\"\r\n\r\n", i)
		enc := base64.StdEncoding.EncodeToString(raw)
		for len(enc) > 76 {
			b.WriteString(enc[:76] + "\r\n")
			enc = enc[76:]
		}
		b.WriteString(enc + "\r\n")
	}
	b.WriteString("--b1--\r\n")
	return &Message{ID: "big", From: "a@example.com", To: rcpts, Body: BytesBody([]byte(b.String()))}, want
}

// sgOldBody is request chunk's body as it was built before streaming: the
// attachments' base64 inside the SGMailV3, encoded whole.
func sgOldBody(t *testing.T, m *Message, chunk int) []byte {
	t.Helper()
	base, parts, chunks, err := mapSendGrid(m)
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range base.Attachments {
		a.Content = base64.StdEncoding.EncodeToString(parts[i])
	}
	req := *base
	req.Personalizations = []*sgmail.Personalization{chunks[chunk].p}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&req); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// checkSGStream checks every request carries the attachments whole, with
// its exact length, and is the body the unstreamed encoding gave.
func checkSGStream(t *testing.T, m *Message, reqs []sgStreamRequest, want [][]byte) {
	t.Helper()
	for i, r := range reqs {
		if r.chunked || r.contentLength != int64(len(r.body)) {
			t.Errorf("request %d: Content-Length %d (chunked %v), body %d bytes", i, r.contentLength, r.chunked, len(r.body))
		}
		if len(r.req.Attachments) != len(want) {
			t.Fatalf("request %d: %d attachments, want %d", i, len(r.req.Attachments), len(want))
		}
		for j, a := range r.req.Attachments {
			got, err := base64.StdEncoding.Strict().DecodeString(*a.Content)
			if err != nil || !bytes.Equal(got, want[j]) {
				t.Errorf("request %d attachment %d: %d bytes decoded (%v), want %d", i, j, len(got), err, len(want[j]))
			}
		}
		if old := sgOldBody(t, m, i); !bytes.Equal(r.body, old) {
			t.Errorf("request %d: body differs from the unstreamed encoding (%d vs %d bytes)", i, len(r.body), len(old))
		}
	}
}

func TestSendGrid_StreamedAttachments(t *testing.T) {
	t.Parallel()
	for _, sizes := range [][]int{
		{2<<20 + 1, 1<<20 + 1}, // size%3 = 0, 2
		{1<<20 + 3, 1},         // size%3 = 1, and a one-byte attachment
	} {
		t.Run(fmt.Sprint(sizes), func(t *testing.T) {
			t.Parallel()
			url, got := newSGStreamFake(t)
			sg := newTestSendGrid(t, url, sgTestKey, 10*time.Second, nil)
			m, want := sgBigMessage([]string{"b@example.net"}, "Bob <b@example.net>", sizes...)
			rc, err := sg.Send(context.Background(), m)
			if err != nil || rc.ProviderID != "stream-1" {
				t.Fatalf("Send = %+v, %v", rc, err)
			}
			reqs := got()
			if len(reqs) != 1 {
				t.Fatalf("%d requests", len(reqs))
			}
			checkSGStream(t, m, reqs, want)
		})
	}
}

func TestSendGrid_StreamedAttachmentsInEveryChunk(t *testing.T) {
	t.Parallel()
	url, got := newSGStreamFake(t)
	sg := newTestSendGrid(t, url, sgTestKey, 10*time.Second, nil)
	rcpts := make([]string, 2500)
	for i := range rcpts {
		rcpts[i] = fmt.Sprintf("user%04d@example.net", i)
	}
	m, want := sgBigMessage(rcpts, "user0000@example.net, user0001@example.net, user0002@example.net", 1<<20+1, 1<<20+3)
	rc, err := sg.Send(context.Background(), m)
	if err != nil || rc.ProviderID != "stream-1,stream-2,stream-3" {
		t.Fatalf("Send = %+v, %v", rc, err)
	}
	reqs := got()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	seen := map[string]bool{}
	for _, r := range reqs {
		p := r.req.Personalizations[0]
		for _, l := range [][]sgWireEmail{p.To, p.CC, p.BCC} {
			for _, e := range l {
				seen[e.Email] = true
			}
		}
	}
	if len(seen) != len(rcpts) {
		t.Errorf("%d recipients sent, want %d", len(seen), len(rcpts))
	}
	checkSGStream(t, m, reqs, want)
}

// The transport may resend a body (GetBody): every reader gives it whole.
func TestSendGrid_StreamReadersAreIndependent(t *testing.T) {
	t.Parallel()
	m, _ := sgBigMessage([]string{"b@example.net"}, "b@example.net", 100_001, 7)
	base, parts, chunks, err := mapSendGrid(m)
	if err != nil {
		t.Fatal(err)
	}
	markers := sgMarkers(len(parts))
	for i, a := range base.Attachments {
		a.Content = markers[i]
	}
	req := *base
	req.Personalizations = []*sgmail.Personalization{chunks[0].p}
	s, err := sgEncode(&req, markers, parts)
	if err != nil {
		t.Fatal(err)
	}
	want := sgOldBody(t, m, 0)
	for i := range 2 {
		b, err := io.ReadAll(s.reader())
		if err != nil || !bytes.Equal(b, want) || s.size != int64(len(want)) {
			t.Errorf("read %d: %d bytes (size %d), want %d (%v)", i, len(b), s.size, len(want), err)
		}
	}
	// Reads of one byte still give whole base64 groups.
	var one bytes.Buffer
	r := s.reader()
	p := make([]byte, 1)
	for {
		n, err := r.Read(p)
		one.Write(p[:n])
		if err != nil {
			break
		}
	}
	if !bytes.Equal(one.Bytes(), want) {
		t.Error("byte-by-byte read differs")
	}
}

// A marker the encoder did not write verbatim (or wrote twice) must stop
// the request rather than send a body without the attachment.
func TestSendGrid_StreamMarkerMissing(t *testing.T) {
	t.Parallel()
	m, _ := sgBigMessage([]string{"b@example.net"}, "b@example.net", 10)
	base, parts, chunks, err := mapSendGrid(m)
	if err != nil {
		t.Fatal(err)
	}
	base.Attachments[0].Content = "something-else"
	req := *base
	req.Personalizations = []*sgmail.Personalization{chunks[0].p}
	if _, err := sgEncode(&req, sgMarkers(1), parts); !errors.Is(err, errPlaceholder) {
		t.Errorf("missing marker: err = %v", err)
	}
	mk := sgMarkers(1)
	base.Attachments[0].Content = mk[0]
	req.Subject = mk[0]
	if _, err := sgEncode(&req, mk, parts); !errors.Is(err, errPlaceholder) {
		t.Errorf("repeated marker: err = %v", err)
	}
}

// sgFailingBody fails reads past off.
type sgFailingBody struct {
	Body
	off int64
}

func (b sgFailingBody) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > b.off {
		return 0, errors.New("disk on fire")
	}
	return b.Body.ReadAt(p, off)
}

// The spool failing is no verdict on the message: Transient, not
// Unsupported.
func TestSendGrid_SpoolReadErrorIsTransient(t *testing.T) {
	t.Parallel()
	url, got := newSGStreamFake(t)
	sg := newTestSendGrid(t, url, sgTestKey, 5*time.Second, nil)
	m, _ := sgBigMessage([]string{"b@example.net"}, "b@example.net", 200_000)
	m.Body = sgFailingBody{Body: m.Body, off: 100_000}
	_, err := sg.Send(context.Background(), m)
	if ClassOf(err) != Transient || !strings.Contains(err.Error(), "disk on fire") {
		t.Errorf("err = %v (class %s), want transient", err, ClassOf(err))
	}
	if n := len(got()); n != 0 {
		t.Errorf("%d requests sent", n)
	}
}

// A request without its placeholders fails every message alike, so it is
// the upstream's fault (failover, breaker), as for SES and Mailgun; other
// encode failures stay this message's.
func TestSendGrid_MissingPlaceholderIsProviderFault(t *testing.T) {
	s := &sendGridUpstream{name: "sg"}
	if err := s.encodeError(fmt.Errorf("the Mail Send JSON: %w", errPlaceholder)); err.Class != ProviderFault {
		t.Errorf("class %s, want provider_fault: %v", err.Class, err)
	}
	if err := s.encodeError(errors.New("json: unsupported value")); err.Class != Unsupported {
		t.Errorf("class %s, want unsupported: %v", err.Class, err)
	}
}
