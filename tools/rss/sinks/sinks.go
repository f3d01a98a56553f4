// Package sinks holds streaming fakes of every upstream type (an SMTP
// server, SES v2 SendEmail, SendGrid Mail Send, Mailgun messages.mime,
// SMTP2GO /v3/email/mime, and a watcher for the file upstream's directory)
// and a large test message, for measuring relaycar's memory with big
// messages: tools/rss and tests/memory_test.go use them.
//
// The fakes never hold a message: they decode the payload as it arrives
// (base64 JSON strings, multipart parts, SMTP DATA), hash it and keep only
// its size, its last bytes and the X-Test-Seq header, so the process that
// runs them stays small however many big messages arrive. They listen on
// 127.0.0.1 only and answer with each provider's documented success reply.
package sinks

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// Kinds lists the upstream types the package fakes, in table order.
var Kinds = []string{"smtp", "file", "ses", "sendgrid", "mailgun", "smtp2go"}

// Provider limits on the raw message (upstreams.providerMaxMessageBytes):
// max_message_bytes may not be set above them.
var ProviderMax = map[string]int64{"ses": 28 << 20, "sendgrid": 30 << 20, "mailgun": 25 << 20}

// MailgunDomain is the sending domain the Mailgun fake serves.
const MailgunDomain = "mg.example.com"

// Message is a large message: a short text part and one base64 attachment
// of random bytes. Every copy shares Body; only the header block differs.
type Message struct {
	Body           string   // MIME body after the header block (starts with the empty line)
	Attachment     [32]byte // SHA-256 of the decoded attachment
	AttachmentSize int64
	Tail           []byte // the last TailLen bytes of every copy
}

// TailLen is how many final payload bytes a sink keeps.
const TailLen = 64

const boundary = "relaycar-big-boundary"

// NewMessage builds a message of about size bytes (header block included).
func NewMessage(size int64) *Message {
	const lineRaw, lineEnc = 57, 78 // 76 base64 characters and CRLF
	pre := "\r\n--" + boundary + "\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
		"A large message for the relaycar memory tests.\r\n" +
		"--" + boundary + "\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n" +
		"Content-Disposition: attachment; filename=\"big.bin\"\r\n\r\n"
	post := "--" + boundary + "--\r\n"
	room := size - int64(len(pre)+len(post)) - 400 // the header block
	n := max(room/lineEnc*lineRaw, lineRaw)
	raw := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{'r', 'e', 'l', 'a', 'y', 'c', 'a', 'r'})
	rng.Read(raw)
	var b strings.Builder
	b.Grow(len(pre) + len(post) + int(n/lineRaw+1)*lineEnc)
	b.WriteString(pre)
	line := make([]byte, base64.StdEncoding.EncodedLen(lineRaw))
	for i := int64(0); i < n; i += lineRaw {
		chunk := raw[i:min(i+lineRaw, n)]
		l := line[:base64.StdEncoding.EncodedLen(len(chunk))]
		base64.StdEncoding.Encode(l, chunk)
		b.Write(l)
		b.WriteString("\r\n")
	}
	b.WriteString(post)
	body := b.String()
	return &Message{Body: body, Attachment: sha256.Sum256(raw), AttachmentSize: n,
		Tail: []byte(body[len(body)-TailLen:])}
}

// Header is the header block of copy seq.
func (m *Message) Header(from, to string, seq int) string {
	return fmt.Sprintf("From: <%s>\r\nTo: <%s>\r\nSubject: big message %d\r\nDate: %s\r\n"+
		"Message-ID: <big-%d.%d@tests.local>\r\nX-Test-Seq: %d\r\nMIME-Version: 1.0\r\n"+
		"Content-Type: multipart/mixed; boundary=\"%s\"\r\n",
		from, to, seq, time.Now().Format(time.RFC1123Z), seq, time.Now().UnixNano(), seq, boundary)
}

// Size is the size of copy seq as submitted.
func (m *Message) Size(from, to string, seq int) int64 {
	return int64(len(m.Header(from, to, seq)) + len(m.Body))
}

// Send submits the message over one SMTP connection to addr.
func (m *Message) Send(addr, helo, from, to string, seq int) error {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = 60*time.Second, 60*time.Second
	defer c.Close()
	if err := c.Hello(helo); err != nil {
		return err
	}
	if err := c.Mail(from, nil); err != nil {
		return err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, io.MultiReader(strings.NewReader(m.Header(from, to, seq)), strings.NewReader(m.Body))); err != nil {
		w.Close()
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// Received is what a sink kept of one message.
type Received struct {
	Seq    int      // X-Test-Seq; -1 when not found
	Size   int64    // payload bytes: the raw message, or SendGrid's decoded attachment
	SHA256 [32]byte // of the payload
	Tail   []byte   // last TailLen payload bytes
	Wire   int64    // request (or DATA) bytes read
	Took   time.Duration
}

// Sink is one running fake.
type Sink struct {
	Kind string
	// Addr is host:port (smtp), the base URL (HTTP APIs) or the directory
	// (file).
	Addr string

	mu          sync.Mutex
	got         []Received
	errs        []error
	inFlight    int
	maxInFlight int
	seen        map[string]bool // file: .json names already read
	stop        func()
}

// Start runs a fake of kind; dir is the file upstream's directory (ignored
// by the others).
func Start(kind, dir string) (*Sink, error) {
	s := &Sink{Kind: kind}
	switch kind {
	case "smtp":
		return s, s.startSMTP()
	case "file":
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		s.Addr, s.seen, s.stop = dir, map[string]bool{}, func() {}
		return s, nil
	case "ses", "sendgrid", "mailgun", "smtp2go":
		return s, s.startHTTP()
	}
	return nil, fmt.Errorf("sinks: unknown kind %q", kind)
}

// Close stops the fake.
func (s *Sink) Close() {
	if s.stop != nil {
		s.stop()
	}
}

// Upstream is the relay.yaml upstreams entry that delivers to this sink;
// maxBytes 0 leaves max_message_bytes at its default.
func (s *Sink) Upstream(name string, maxBytes int64) map[string]any {
	u := map[string]any{"name": name, "type": s.Kind}
	switch s.Kind {
	case "smtp":
		u["address"], u["tls"] = s.Addr, "none"
	case "file":
		u["dir"] = s.Addr
	case "ses":
		u["region"], u["endpoint"] = "us-east-1", s.Addr
		u["access_key_id"], u["secret_access_key"] = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	case "sendgrid":
		u["api_key"], u["endpoint"] = "SG.dummy-key-for-the-memory-tests", s.Addr
	case "mailgun":
		u["domain"], u["api_key"], u["endpoint"] = MailgunDomain, "key-dummy-for-the-memory-tests", s.Addr
	case "smtp2go":
		u["api_key"], u["endpoint"] = "api-0123456789abcdef0123456789abcdef", s.Addr
	}
	if maxBytes > 0 {
		u["max_message_bytes"] = maxBytes
	}
	return u
}

// Count is the number of messages received whole.
func (s *Sink) Count() int {
	if s.Kind == "file" {
		m, _ := filepath.Glob(filepath.Join(s.Addr, "*.json"))
		return len(m)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

// Received lists the messages received, in arrival order (file: in name
// order, read from disk now).
func (s *Sink) Received() []Received {
	if s.Kind == "file" {
		s.readFiles()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.got)
}

// Errors lists requests the fake could not decode.
func (s *Sink) Errors() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.errs)
}

// MaxInFlight is the most requests (SMTP: DATA phases) in progress at once.
func (s *Sink) MaxInFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInFlight
}

// Verify checks that exactly copies 0..n-1 of m arrived, each whole.
func (s *Sink) Verify(m *Message, from, to string, n int) error {
	var problems []string
	got := s.Received()
	if len(got) != n {
		problems = append(problems, fmt.Sprintf("%d messages received, want %d", len(got), n))
	}
	if errs := s.Errors(); len(errs) > 0 {
		problems = append(problems, fmt.Sprintf("%d undecodable requests, first: %v", len(errs), errs[0]))
	}
	seen := map[int]bool{}
	for i, r := range got {
		if r.Seq < 0 || r.Seq >= n || seen[r.Seq] {
			problems = append(problems, fmt.Sprintf("message %d: X-Test-Seq %d unexpected or repeated", i, r.Seq))
			continue
		}
		seen[r.Seq] = true
		if s.Kind == "sendgrid" {
			if r.Size != m.AttachmentSize || r.SHA256 != m.Attachment {
				problems = append(problems, fmt.Sprintf("message %d: attachment of %d bytes (sha256 %x), want %d (%x)",
					r.Seq, r.Size, r.SHA256[:6], m.AttachmentSize, m.Attachment[:6]))
			}
			continue
		}
		// The relay adds a Received header (and SMTP2GO's copy a Bcc); the
		// body ends unchanged.
		want := m.Size(from, to, r.Seq)
		if r.Size < want-200 || r.Size > want+16<<10 || !bytes.Equal(r.Tail, m.Tail) {
			problems = append(problems, fmt.Sprintf("message %d: %d bytes (submitted %d), tail match %v",
				r.Seq, r.Size, want, bytes.Equal(r.Tail, m.Tail)))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s sink: %s", s.Kind, strings.Join(problems, "; "))
	}
	return nil
}

func (s *Sink) begin() time.Time {
	s.mu.Lock()
	s.inFlight++
	s.maxInFlight = max(s.maxInFlight, s.inFlight)
	s.mu.Unlock()
	return time.Now()
}

func (s *Sink) end(r *Received, err error, start time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inFlight--
	if err != nil {
		s.errs = append(s.errs, err)
		return
	}
	r.Took = time.Since(start)
	s.got = append(s.got, *r)
}

// recorder hashes a payload as it streams past and keeps its size, its
// head (for X-Test-Seq) and its tail.
type recorder struct {
	h    interface{ Sum([]byte) []byte }
	w    io.Writer
	n    int64
	head []byte
	tail []byte
}

const headLen = 16 << 10

func newRecorder() *recorder {
	h := sha256.New()
	return &recorder{h: h, w: h}
}

func (r *recorder) Write(p []byte) (int, error) {
	r.w.Write(p)
	r.n += int64(len(p))
	if len(r.head) < headLen {
		r.head = append(r.head, p[:min(len(p), headLen-len(r.head))]...)
	}
	if len(p) >= TailLen {
		r.tail = append(r.tail[:0], p[len(p)-TailLen:]...)
	} else {
		r.tail = append(r.tail, p...)
		if len(r.tail) > TailLen {
			r.tail = r.tail[len(r.tail)-TailLen:]
		}
	}
	return len(p), nil
}

var seqRE = regexp.MustCompile(`X-Test-Seq(?:: |":\s*")(\d+)`)

// result turns the recorder into a Received; meta is request bytes outside
// the payload (SendGrid's headers object).
func (r *recorder) result(meta []byte, wire int64) *Received {
	out := &Received{Seq: -1, Size: r.n, Tail: slices.Clone(r.tail), Wire: wire}
	copy(out.SHA256[:], r.h.Sum(nil))
	for _, b := range [][]byte{r.head, meta} {
		if m := seqRE.FindSubmatch(b); m != nil {
			out.Seq, _ = strconv.Atoi(string(m[1]))
			break
		}
	}
	return out
}

// bounded keeps the first max bytes written to it.
type bounded struct {
	b   []byte
	max int
}

func (b *bounded) Write(p []byte) (int, error) {
	if room := b.max - len(b.b); room > 0 {
		b.b = append(b.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// counter counts bytes read.
type counter struct {
	r io.Reader
	n int64
}

func (c *counter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// --- SMTP --------------------------------------------------------------

func (s *Sink) startSMTP() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := smtp.NewServer(smtpBackend{s})
	srv.Domain = "sink.test"
	srv.MaxMessageBytes = 1 << 30
	srv.MaxRecipients = 1000
	srv.ReadTimeout, srv.WriteTimeout = 60*time.Second, 60*time.Second
	srv.AllowInsecureAuth = true
	srv.ErrorLog = nopLogger{}
	s.Addr, s.stop = ln.Addr().String(), func() { srv.Close() }
	go srv.Serve(ln)
	return nil
}

type smtpBackend struct{ s *Sink }

func (b smtpBackend) NewSession(*smtp.Conn) (smtp.Session, error) { return &smtpSession{s: b.s}, nil }

type smtpSession struct{ s *Sink }

func (ss *smtpSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss *smtpSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (ss *smtpSession) Reset()                               {}
func (ss *smtpSession) Logout() error                        { return nil }
func (ss *smtpSession) Data(r io.Reader) error {
	start := ss.s.begin()
	rec := newRecorder()
	c := &counter{r: r}
	_, err := io.Copy(rec, c)
	ss.s.end(rec.result(nil, c.n), err, start)
	return err
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}
func (nopLogger) Println(...any)        {}

// --- HTTP APIs ---------------------------------------------------------

func (s *Sink) startHTTP() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(s.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	s.Addr = "http://" + ln.Addr().String()
	s.stop = func() { srv.Close() }
	go srv.Serve(ln)
	return nil
}

func (s *Sink) serveHTTP(w http.ResponseWriter, r *http.Request) {
	defer io.Copy(io.Discard, r.Body)
	want := map[string]string{
		"ses":      "/v2/email/outbound-emails",
		"sendgrid": "/v3/mail/send",
		"mailgun":  "/v3/" + MailgunDomain + "/messages.mime",
		"smtp2go":  "/v3/email/mime",
	}[s.Kind]
	if r.Method != http.MethodPost || r.URL.Path != want {
		http.Error(w, `{"message":"not found"}`, http.StatusNotFound)
		return
	}
	start := s.begin()
	c := &counter{r: r.Body}
	var (
		res *Received
		err error
	)
	switch s.Kind {
	case "ses":
		res, err = jsonPayload(c, `"Data":"`)
	case "smtp2go":
		res, err = jsonPayload(c, `"mime_email":"`)
	case "sendgrid":
		res, err = jsonPayload(c, `"content":"`) // the attachment's base64
	case "mailgun":
		res, err = mailgunPayload(r, c)
	}
	if err == nil {
		res.Wire = c.n
	}
	s.end(res, err, start)
	if err != nil {
		http.Error(w, `{"message":"`+strings.ReplaceAll(err.Error(), `"`, `'`)+`"}`, http.StatusBadRequest)
		return
	}
	id := fmt.Sprintf("sink-%d-%d", time.Now().UnixNano(), res.Seq)
	switch s.Kind {
	case "ses":
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("x-amzn-RequestId", id)
		fmt.Fprintf(w, `{"MessageId":"%s"}`, id)
	case "sendgrid":
		w.Header().Set("X-Message-Id", id)
		w.WriteHeader(http.StatusAccepted)
	case "mailgun":
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"<%s@%s>","message":"Queued. Thank you."}`, id, MailgunDomain)
	case "smtp2go":
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"request_id":"%s","data":{"succeeded":1,"failed":0,"failures":[],"email_id":"%s"}}`, id, id)
	}
}

// jsonPayload finds marker (a key and the opening quote of its string
// value) in a JSON document and base64-decodes the string as it streams;
// the bytes around it are kept (bounded) for X-Test-Seq.
func jsonPayload(r io.Reader, marker string) (*Received, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	meta := &bounded{max: 256 << 10}
	if err := skipTo(br, marker, meta); err != nil {
		return nil, fmt.Errorf("no %s in the request: %v", marker, err)
	}
	rec := newRecorder()
	if _, err := io.Copy(rec, base64.NewDecoder(base64.StdEncoding, &jsonString{r: br})); err != nil {
		return nil, fmt.Errorf("decoding %s: %v", marker, err)
	}
	if _, err := io.Copy(meta, br); err != nil {
		return nil, err
	}
	return rec.result(meta.b, 0), nil
}

// skipTo reads up to and including marker, copying what it passes to meta.
func skipTo(br *bufio.Reader, marker string, meta io.Writer) error {
	matched := 0
	for {
		b, err := br.ReadByte()
		if err != nil {
			return err
		}
		meta.Write([]byte{b})
		switch {
		case b == marker[matched]:
			matched++
			if matched == len(marker) {
				return nil
			}
		case b == marker[0]:
			matched = 1
		default:
			matched = 0
		}
	}
}

// jsonString reads a JSON string's contents up to its closing quote. Only
// base64 is expected, so escapes are dropped (`\/` is `/`).
type jsonString struct {
	r    *bufio.Reader
	done bool
}

func (j *jsonString) Read(p []byte) (int, error) {
	for !j.done {
		if _, err := j.r.Peek(1); err != nil {
			return 0, io.ErrUnexpectedEOF
		}
		chunk, _ := j.r.Peek(min(j.r.Buffered(), len(p)))
		end := bytes.IndexByte(chunk, '"')
		if end < 0 {
			end = len(chunk)
		} else {
			j.done = true
		}
		n := 0
		for _, c := range chunk[:end] {
			if c != '\\' {
				p[n] = c
				n++
			}
		}
		j.r.Discard(end)
		if j.done {
			j.r.Discard(1)
		}
		if n > 0 {
			return n, nil
		}
	}
	return 0, io.EOF
}

// mailgunPayload streams a messages.mime form: the `message` file part is
// the payload.
func mailgunPayload(r *http.Request, c *counter) (*Received, error) {
	_, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || params["boundary"] == "" {
		return nil, fmt.Errorf("not multipart/form-data: %q", r.Header.Get("Content-Type"))
	}
	mr := multipart.NewReader(c, params["boundary"])
	var res *Received
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if p.FormName() == "message" {
			if res != nil {
				return nil, errors.New("more than one message part")
			}
			rec := newRecorder()
			if _, err := io.Copy(rec, p); err != nil {
				return nil, err
			}
			res = rec.result(nil, 0)
		} else {
			io.Copy(io.Discard, p)
		}
	}
	if res == nil {
		return nil, errors.New("no message part")
	}
	return res, nil
}

// --- file --------------------------------------------------------------

// readFiles reads the .eml of every .json the file upstream finished.
func (s *Sink) readFiles() {
	names, _ := filepath.Glob(filepath.Join(s.Addr, "*.json"))
	slices.Sort(names)
	for _, name := range names {
		s.mu.Lock()
		done := s.seen[name]
		s.mu.Unlock()
		if done {
			continue
		}
		f, err := os.Open(strings.TrimSuffix(name, ".json") + ".eml")
		rec := newRecorder()
		if err == nil {
			_, err = io.Copy(rec, f)
			f.Close()
		}
		s.mu.Lock()
		s.seen[name] = true
		if err != nil {
			s.errs = append(s.errs, err)
		} else {
			s.got = append(s.got, *rec.result(nil, rec.n))
		}
		s.mu.Unlock()
	}
}
