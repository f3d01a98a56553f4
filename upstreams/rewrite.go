package upstreams

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"slices"
	"strings"

	"github.com/emersion/go-message/textproto"

	"github.com/relaycar/relaycar/internal/mailhdr"
)

// rewriteMaxHeader bounds the header section read for an edit: the
// relay's 256 KiB intake limit plus room for the fields it prepends.
const rewriteMaxHeader = 320 << 10

// protectedHeaders are the fields `headers` may neither add nor remove,
// lower-cased. From, To, Cc and Bcc must agree with the envelope (some
// upstreams mail every header recipient; From has rewrite_from), the
// relay's stable Message-ID lets a provider drop a retried duplicate,
// Date is mandatory (RFC 5322), Received is the trace loops are caught
// by, Return-Path belongs to the final delivery, and the MIME fields
// decide how the body reads.
var protectedHeaders = []string{
	"from", "to", "cc", "bcc", "message-id", "date", "received", "return-path",
	"mime-version", "content-type", "content-transfer-encoding",
}

// Rewrite returns u with c's rewrite_from and headers applied to its copy
// of each message, or u itself when c sets neither: the edits belong to
// one upstream, so a failover partner still gets the original.
func Rewrite(u Upstream, c Config) Upstream {
	if c.RewriteFrom == "" && len(c.Headers.Add) == 0 && len(c.Headers.Remove) == 0 {
		return u
	}
	rw := &rewriter{u: u, e: Edit{From: c.RewriteFrom, Headers: c.Headers}}
	if _, ok := u.(Closer); ok {
		return rewriteCloser{rw}
	}
	return rw
}

type rewriter struct {
	u Upstream
	e Edit
}

func (r *rewriter) Name() string { return r.u.Name() }

// Unwrap is the adapter underneath, for what asks the provider rather
// than sending through it (quotas, check --live).
func (r *rewriter) Unwrap() Upstream { return r.u }

// Unwrap returns what u wraps (Rewrite), or u itself.
func Unwrap(u Upstream) Upstream {
	for {
		w, ok := u.(interface{ Unwrap() Upstream })
		if !ok {
			return u
		}
		u = w.Unwrap()
	}
}

func (r *rewriter) Send(ctx context.Context, m *Message) (Receipt, error) {
	m2, err := EditMessage(m, r.e)
	if err != nil {
		return Receipt{}, r.editError(err)
	}
	return r.u.Send(ctx, m2)
}

// editError classifies a failed edit: a spool read error may pass, a
// header the edit cannot parse never will on this upstream.
func (r *rewriter) editError(err error) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		c := *e
		c.Upstream = r.u.Name()
		return &c
	}
	return &Error{Upstream: r.u.Name(), Class: Transient, Reason: "rewriting the message: " + err.Error(), err: err}
}

// rewriteCloser is a rewriter whose upstream holds connections.
type rewriteCloser struct{ *rewriter }

func (r rewriteCloser) Close() error { return r.u.(Closer).Close() }

// Edit is what one copy of a message changes. The header edits come last,
// so they have the last word (headers.remove: [Reply-To] also drops the
// Reply-To that rewrite_from adds).
type Edit struct {
	// From replaces the envelope sender and the From address, keeping the
	// display name; the original From becomes Reply-To if there is none.
	From string
	// Headers: Add replaces every field of that name, Remove drops every
	// field of that name; names are case-insensitive.
	Headers HeaderEdits
}

// EditMessage returns a copy of m with e applied. The new Body is the new
// header section in memory spliced onto the original body, read in place,
// so a large message is not copied. ID and MessageID stay.
func EditMessage(m *Message, e Edit) (*Message, error) {
	return editHeader(m, func(h *textproto.Header) {
		if e.From != "" {
			rewriteFrom(h, e.From)
		}
		for _, name := range e.Headers.Remove {
			h.Del(name)
		}
		for _, name := range sortedKeys(e.Headers.Add) {
			h.Del(name)
			h.AddRaw(fieldBytes(name, e.Headers.Add[name]))
		}
	}, func(out *Message) {
		if e.From != "" {
			out.From = e.From
		}
	})
}

// Redirect returns a copy of m for staging: delivered to to only, each
// envelope recipient of m in its own X-Original-To, To replaced by to, and
// Cc and Bcc removed, since some upstreams mail every header recipient.
func Redirect(m *Message, to []string) (*Message, error) {
	return editHeader(m, func(h *textproto.Header) {
		h.Del("Cc")
		h.Del("Bcc")
		h.Del("X-Original-To")
		// Fields added later are written first: add in reverse to keep
		// the recipients' order.
		for _, rcpt := range slices.Backward(m.To) {
			h.AddRaw(fieldBytes("X-Original-To", rcpt))
		}
		h.Del("To")
		// One address per folded line keeps every line far below 998.
		h.AddRaw([]byte("To: " + strings.Join(to, ",\r\n ") + "\r\n"))
	}, func(out *Message) {
		out.To, out.AllRcpts = slices.Clone(to), slices.Clone(to)
	})
}

// editHeader reads m's header section, lets edit change it and splices
// the result onto the rest of m's body; env adjusts the envelope.
func editHeader(m *Message, edit func(*textproto.Header), env func(*Message)) (*Message, error) {
	n := min(m.Body.Size(), rewriteMaxHeader)
	buf := make([]byte, n)
	if _, err := m.Body.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("reading the header section: %w", err)
	}
	hdr, bodyOff := mailhdr.Split(buf)
	if int64(bodyOff) == n && n < m.Body.Size() {
		return nil, &Error{Class: Unsupported, Reason: fmt.Sprintf("header section longer than %d bytes; cannot rewrite it", rewriteMaxHeader)}
	}
	hr := bytes.NewReader(hdr)
	br := bufio.NewReader(hr)
	h, err := textproto.ReadHeader(br)
	if (err != nil && !errors.Is(err, io.EOF)) || hr.Len()+br.Buffered() != 0 {
		// Not a header section the parser takes whole: as in prepare,
		// all of it is body, behind the new fields.
		h, bodyOff = textproto.Header{}, 0
	}
	edit(&h)
	var b bytes.Buffer
	if err := textproto.WriteHeader(&b, h); err != nil {
		return nil, &Error{Class: Unsupported, Reason: "writing the rewritten header: " + err.Error()}
	}
	out := *m
	out.Body = &splicedBody{head: b.Bytes(), rest: io.NewSectionReader(m.Body, int64(bodyOff), m.Body.Size()-int64(bodyOff))}
	env(&out)
	return &out, nil
}

// rewriteFrom points the From field at addr, keeping the display name,
// and keeps the original as Reply-To when the message names none.
func rewriteFrom(h *textproto.Header, addr string) {
	orig, _ := h.Raw("From")
	name, raw := displayName(h.Get("From"))
	h.Del("From")
	from := addr
	switch {
	case raw != "":
		from = raw + " <" + addr + ">"
	case name != "":
		from = (&mail.Address{Name: name, Address: addr}).String()
	}
	h.AddRaw([]byte("From: " + from + "\r\n"))
	if len(orig) > 0 && !h.Has("Reply-To") {
		// The original field's bytes, folding and encoding included.
		colon := bytes.IndexByte(orig, ':')
		h.AddRaw(append([]byte("Reply-To:"), orig[colon+1:]...))
	}
}

// displayName returns the display name of the first address of a From
// value, decoded. A name in a charset Go does not decode comes back raw:
// its encoded words are kept as they are.
func displayName(v string) (name, raw string) {
	if v == "" {
		return "", ""
	}
	p := mail.AddressParser{WordDecoder: &mime.WordDecoder{}}
	if list, err := p.ParseList(v); err == nil && len(list) > 0 {
		return list[0].Name, ""
	}
	i := strings.LastIndexByte(v, '<')
	if i <= 0 {
		return "", ""
	}
	phrase := strings.TrimSpace(v[:i])
	for j := 0; j < len(phrase); j++ {
		if c := phrase[j]; c < 0x20 || c > 0x7e || c == '<' || c == '>' || c == ',' {
			return "", ""
		}
	}
	return "", phrase
}

// fieldBytes formats a configured field, folded and with non-ASCII values
// encoded as RFC 2047 words, in the name's own spelling.
func fieldBytes(name, value string) []byte {
	for i := 0; i < len(value); i++ {
		if value[i] >= 0x80 {
			value = mime.QEncoding.Encode("utf-8", value)
			break
		}
	}
	var tmp textproto.Header
	tmp.Add(name, value)
	b, err := tmp.Raw(name)
	if err != nil || len(b) < len(name) {
		return []byte(name + ": " + value + "\r\n")
	}
	// Add canonicalises the name; keep the configured spelling.
	return append([]byte(name), b[len(name):]...)
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// splicedBody is a new header section followed by a section of the
// original body, read where it rests.
type splicedBody struct {
	head []byte
	rest *io.SectionReader
}

func (s *splicedBody) Size() int64 { return int64(len(s.head)) + s.rest.Size() }

func (s *splicedBody) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("splicedBody.ReadAt: negative offset")
	}
	n := 0
	if off < int64(len(s.head)) {
		n = copy(p, s.head[off:])
		if n == len(p) {
			return n, nil
		}
	}
	m, err := s.rest.ReadAt(p[n:], max(0, off-int64(len(s.head))))
	return n + m, err
}

var (
	_ Upstream = (*rewriter)(nil)
	_ Closer   = rewriteCloser{}
	_ Body     = (*splicedBody)(nil)
)

// validateRewrite checks rewrite_from and headers; bad is Validate's.
func (c *Config) validateRewrite(bad func(key, format string, args ...any)) {
	if c.RewriteFrom != "" {
		if msg := PlainAddressProblem(c.RewriteFrom); msg != "" {
			bad("rewrite_from", "%q: %s", c.RewriteFrom, msg)
		}
	}
	for _, name := range sortedKeys(c.Headers.Add) {
		key := "headers.add." + name
		if msg := headerNameProblem(name); msg != "" {
			bad(key, "%s", msg)
		} else if strings.ContainsAny(c.Headers.Add[name], "\r\n\x00") {
			bad(key, "value must not contain CR, LF or NUL")
		}
	}
	added := map[string]bool{}
	for name := range c.Headers.Add {
		added[strings.ToLower(name)] = true
	}
	for i, name := range c.Headers.Remove {
		key := fmt.Sprintf("headers.remove[%d]", i)
		if msg := headerNameProblem(name); msg != "" {
			bad(key, "%s", msg)
		} else if added[strings.ToLower(name)] {
			bad(key, "%q is also in headers.add (add already replaces the field)", name)
		}
	}
}

// headerNameProblem says why name cannot be edited, "" if it can.
func headerNameProblem(name string) string {
	if name == "" {
		return "empty header name"
	}
	for i := 0; i < len(name); i++ {
		// RFC 5322 field-name: printable US-ASCII except the colon.
		if c := name[i]; c < 33 || c > 126 || c == ':' {
			return fmt.Sprintf("%q is not a header field name (printable ASCII without spaces or ':')", name)
		}
	}
	if slices.Contains(protectedHeaders, strings.ToLower(name)) {
		return fmt.Sprintf("%q is managed by the relay and cannot be edited", name)
	}
	return ""
}

// PlainAddressProblem says why s is not a bare address (no display name,
// no angle brackets), "" if it is one: rewrite_from and redirect_all_to
// must be one.
func PlainAddressProblem(s string) string {
	if strings.ContainsAny(s, "\r\n") {
		return "must not contain CR or LF"
	}
	a, err := mail.ParseAddress(s)
	switch {
	case err != nil:
		return "not an email address: " + err.Error()
	case a.Name != "" || a.Address != s:
		return "use the bare address, without a display name or angle brackets"
	}
	return ""
}
