package upstreams

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/quotedprintable"
	"net/mail"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jhillyerd/enmime/v2"
	sgmail "github.com/sendgrid/sendgrid-go/helpers/mail"
	"golang.org/x/net/idna"
)

// The mapping of a message onto SendGrid's Mail Send JSON schema.

// sgMappingError is why a message cannot be mapped onto a Mail Send request
// faithfully. Send reports it as Unsupported with reason as the text, so the
// route can fail over to an upstream that sends raw bytes.
type sgMappingError struct{ reason string }

func (e *sgMappingError) Error() string { return e.reason }

// sgUnmappable returns a *sgMappingError with the given reason.
func sgUnmappable(reason string) error { return &sgMappingError{reason: reason} }

// sgRcptKind is the personalization list a recipient goes into.
type sgRcptKind int

const (
	sgTo sgRcptKind = iota
	sgCc
	sgBcc
)

// sgChunk is one request's personalization and the envelope recipients it
// delivers to.
type sgChunk struct {
	p     *sgmail.Personalization
	rcpts []string
}

// sendGridReserved are the headers SendGrid refuses in `headers` (case-
// insensitive), plus MIME-Version: SendGrid writes its own MIME structure.
var sendGridReserved = map[string]bool{
	"x-sg-id": true, "x-sg-eid": true, "received": true, "dkim-signature": true,
	"content-type": true, "content-transfer-encoding": true, "to": true, "from": true,
	"subject": true, "reply-to": true, "cc": true, "bcc": true, "mime-version": true,
}

// mapSendGrid maps m onto a Mail Send request without personalizations, the
// decoded content of each of its attachments (whose Content is left empty),
// and the personalizations to send it with. err, a *sgMappingError, is set,
// and nothing else, when the message cannot be carried faithfully; any
// other err is the spool's.
//
// The message is read from the spool, not loaded: enmime keeps the decoded
// parts, which is all the mapping needs.
func mapSendGrid(m *Message) (base *sgmail.SGMailV3, parts [][]byte, chunks []sgChunk, err error) {
	src := &sgSource{body: m.Body}
	base, parts, chunks, err = mapSendGridFrom(m, src)
	if src.err != nil {
		return nil, nil, nil, src.err
	}
	return base, parts, chunks, err
}

func mapSendGridFrom(m *Message, src *sgSource) (base *sgmail.SGMailV3, parts [][]byte, chunks []sgChunk, err error) {
	parser := enmime.NewParser(enmime.DisableTextConversion(true), enmime.DisableCharacterDetection(true))
	root, err := parser.ReadParts(src.reader())
	if err != nil {
		return nil, nil, nil, sgUnmappable("cannot parse the MIME structure: " + oneLine(err.Error()))
	}
	env, err := parser.EnvelopeFromPart(root)
	if err != nil {
		return nil, nil, nil, sgUnmappable("cannot parse the MIME structure: " + oneLine(err.Error()))
	}
	base = &sgmail.SGMailV3{}

	// From: the header's single address; the envelope sender only when the
	// header is missing (as an MTA would add it).
	from, err := env.AddressList("From")
	switch {
	case errors.Is(err, mail.ErrHeaderNotPresent) || (err == nil && len(from) == 0):
		if m.From == "" {
			return nil, nil, nil, sgUnmappable("message has no From header and a null envelope sender")
		}
		from = []*mail.Address{{Address: m.From}}
	case err != nil:
		return nil, nil, nil, sgUnmappable("cannot parse the From header: " + oneLine(err.Error()))
	case len(from) > 1:
		return nil, nil, nil, sgUnmappable("SendGrid takes one From address; the message has " + strconv.Itoa(len(from)))
	}
	addr, ok := sgAddress(from[0].Address)
	if !ok {
		return nil, nil, nil, sgUnmappable("SendGrid does not support the From address (non-ASCII local part or invalid address)")
	}
	base.From = &sgmail.Email{Name: from[0].Name, Address: addr}

	replyTo, err := env.AddressList("Reply-To")
	if err != nil && !errors.Is(err, mail.ErrHeaderNotPresent) {
		return nil, nil, nil, sgUnmappable("cannot parse the Reply-To header: " + oneLine(err.Error()))
	}
	var rt []*sgmail.Email
	seenRT := map[string]bool{}
	for _, a := range replyTo {
		addr, ok := sgAddress(a.Address)
		if !ok {
			return nil, nil, nil, sgUnmappable("SendGrid does not support a Reply-To address (non-ASCII local part or invalid address)")
		}
		if k := strings.ToLower(addr); !seenRT[k] {
			seenRT[k] = true
			rt = append(rt, &sgmail.Email{Name: a.Name, Address: addr})
		}
	}
	switch {
	case len(rt) == 1:
		base.ReplyTo = rt[0]
	case len(rt) > 1:
		base.ReplyToList = rt
	}

	base.Subject = env.GetHeader("Subject")
	if strings.TrimSpace(base.Subject) == "" {
		return nil, nil, nil, sgUnmappable("SendGrid requires a subject and the message has none")
	}

	parts, err = sgBodyAndParts(src, root, base)
	if err != nil {
		return nil, nil, nil, err
	}
	base.Headers = sgHeaders(sgHeaderBlock(src.reader()))

	chunks, err = sgPersonalizations(m, env)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, s := range sgStrings(base) {
		if !utf8.ValidString(s) {
			return nil, nil, nil, sgUnmappable("message has header or body text that is not valid UTF-8 after decoding")
		}
	}
	return base, parts, chunks, nil
}

// sgPersonalizations builds to/cc from the To and Cc headers, restricted to
// the envelope recipients, and bcc from the envelope recipients in neither;
// the Bcc header is never sent. Requests are split so that none has more than
// 1,000 recipients, each with at least one To recipient, as SendGrid requires.
func sgPersonalizations(m *Message, env *enmime.Envelope) ([]sgChunk, error) {
	type rcpt struct {
		email *sgmail.Email
		env   string
	}
	envelope := map[string]string{} // normalized -> envelope spelling
	var order []string
	for _, r := range m.To {
		a, ok := sgAddress(r)
		if !ok {
			return nil, sgUnmappable("SendGrid does not support the recipient address " + strconv.Quote(r) + " (non-ASCII local part or invalid address)")
		}
		k := strings.ToLower(a)
		if _, dup := envelope[k]; !dup {
			envelope[k] = r
			order = append(order, k)
		}
	}
	if len(order) == 0 {
		return nil, sgUnmappable("message has no recipients")
	}
	used := map[string]bool{}
	visible := func(header string) ([]rcpt, error) {
		list, err := env.AddressList(header)
		if err != nil && !errors.Is(err, mail.ErrHeaderNotPresent) {
			return nil, sgUnmappable("cannot parse the " + header + " header: " + oneLine(err.Error()))
		}
		var out []rcpt
		for _, a := range list {
			addr, ok := sgAddress(a.Address)
			if !ok {
				continue // not an envelope recipient we could send to anyway
			}
			k := strings.ToLower(addr)
			r, isRcpt := envelope[k]
			if !isRcpt || used[k] {
				continue
			}
			used[k] = true
			name := a.Name
			if !utf8.ValidString(name) {
				return nil, sgUnmappable("the " + header + " header has a display name that is not valid UTF-8")
			}
			if strings.ContainsAny(name, ";,") {
				// SendGrid rejects names with ';' or ','; keep the address.
				name = ""
			}
			out = append(out, rcpt{&sgmail.Email{Name: name, Address: addr}, r})
		}
		return out, nil
	}
	to, err := visible("To")
	if err != nil {
		return nil, err
	}
	cc, err := visible("Cc")
	if err != nil {
		return nil, err
	}
	var bcc []rcpt
	for _, k := range order {
		if !used[k] {
			a, _ := sgAddress(envelope[k])
			bcc = append(bcc, rcpt{&sgmail.Email{Address: a}, envelope[k]})
		}
	}
	if len(to) == 0 {
		return nil, sgUnmappable("SendGrid needs a To recipient in every request and no envelope recipient is in the To header")
	}

	total := len(to) + len(cc) + len(bcc)
	n := (total + sendGridMaxRecipients - 1) / sendGridMaxRecipients
	if n > len(to) {
		return nil, sgUnmappable(fmt.Sprintf("%d recipients need %d requests of at most %d, each with a To recipient, but only %d are in To",
			total, n, sendGridMaxRecipients, len(to)))
	}
	chunks := make([]sgChunk, n)
	add := func(c *sgChunk, r rcpt, kind sgRcptKind) {
		if c.p == nil {
			c.p = &sgmail.Personalization{}
		}
		switch kind {
		case sgTo:
			c.p.To = append(c.p.To, r.email)
		case sgCc:
			c.p.CC = append(c.p.CC, r.email)
		default: // sgBcc
			c.p.BCC = append(c.p.BCC, r.email)
		}
		c.rcpts = append(c.rcpts, r.env)
	}
	for k := range n {
		add(&chunks[k], to[k], sgTo)
	}
	k := 0
	place := func(r rcpt, kind sgRcptKind) {
		for len(chunks[k].rcpts) >= sendGridMaxRecipients {
			k++
		}
		add(&chunks[k], r, kind)
	}
	for _, r := range to[n:] {
		place(r, sgTo)
	}
	for _, r := range cc {
		place(r, sgCc)
	}
	for _, r := range bcc {
		place(r, sgBcc)
	}
	return chunks, nil
}

// sgAddress returns addr as SendGrid takes it: an internationalized domain
// becomes its A-label, a non-ASCII local part (SMTPUTF8) is not supported.
func sgAddress(addr string) (string, bool) {
	i := strings.LastIndexByte(addr, '@')
	if i <= 0 || i == len(addr)-1 {
		return "", false
	}
	local, domain := addr[:i], addr[i+1:]
	if !IsASCII(local) {
		return "", false
	}
	if !IsASCII(domain) {
		d, err := idna.Lookup.ToASCII(domain)
		if err != nil {
			return "", false
		}
		domain = d
	}
	return local + "@" + domain, true
}

// sgHeaders returns the top-level header fields SendGrid may carry, with
// their names as written and values unfolded. Reserved fields and the MIME
// entity fields of the original root (Content-*) are left out; of a
// repeated field only the first is kept, as `headers` is a JSON object.
func sgHeaders(data []byte) map[string]string {
	type field struct{ name, value string }
	var fields []field
	for len(data) > 0 {
		var line string
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = string(data[:i]), data[i+1:]
		} else {
			line, data = string(data), nil
		}
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			break // end of the header section
		}
		if line[0] == ' ' || line[0] == '\t' {
			if len(fields) > 0 {
				fields[len(fields)-1].value += line // unfolding removes only the CRLF
			}
			continue
		}
		i := strings.IndexByte(line, ':')
		if i <= 0 {
			continue
		}
		fields = append(fields, field{strings.TrimRight(line[:i], " \t"), line[i+1:]})
	}
	out := map[string]string{}
	seen := map[string]bool{}
	for _, f := range fields {
		k := strings.ToLower(f.name)
		if seen[k] || sendGridReserved[k] || strings.HasPrefix(k, "content-") {
			continue
		}
		seen[k] = true
		out[f.name] = strings.TrimSpace(f.value)
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// sgBody is a text/plain or text/html body part and the alternative it is
// one branch of.
type sgBody struct {
	part   *enmime.Part
	alt    *enmime.Part
	branch int
}

// sgWalker sorts a MIME tree into bodies and attachments, or finds why it
// cannot be carried by SendGrid.
type sgWalker struct {
	bodies []sgBody
	leaves []*enmime.Part
	err    error // a *sgMappingError
}

func sgType(p *enmime.Part) string {
	if p.ContentType == "" {
		return "text/plain" // RFC 2045 5.2
	}
	return strings.ToLower(p.ContentType)
}

func (w *sgWalker) walk(p *enmime.Part, alt *enmime.Part, branch int, resource bool) {
	if w.err != nil {
		return
	}
	ct := sgType(p)
	disp := strings.ToLower(p.Disposition)
	switch {
	case ct == "multipart/signed" || ct == "multipart/encrypted":
		w.err = sgUnmappable(ct + " (signed or encrypted mail) cannot be carried by the SendGrid API")
	case (ct == "application/pkcs7-mime" || ct == "application/x-pkcs7-mime" || ct == "application/pgp-encrypted") &&
		(p.Parent == nil || disp != "attachment"):
		w.err = sgUnmappable(ct + " (S/MIME or PGP mail) cannot be carried by the SendGrid API")
	case strings.HasPrefix(ct, "multipart/"):
		w.multipart(p, ct, alt, branch, resource)
	case !resource && (ct == "text/plain" || ct == "text/html") && disp != "attachment" && p.FileName == "":
		w.bodies = append(w.bodies, sgBody{p, alt, branch})
	default:
		w.leaves = append(w.leaves, p)
	}
}

func (w *sgWalker) multipart(p *enmime.Part, ct string, alt *enmime.Part, branch int, resource bool) {
	var children []*enmime.Part
	for c := p.FirstChild; c != nil; c = c.NextSibling {
		children = append(children, c)
	}
	switch {
	case ct == "multipart/mixed" || ct == "multipart/parallel":
		for _, c := range children {
			w.walk(c, alt, branch, resource)
		}
	case ct == "multipart/related":
		root := relatedRoot(p, children)
		for _, c := range children {
			w.walk(c, alt, branch, resource || c != root)
		}
	case ct == "multipart/alternative" && !resource:
		for i, c := range children {
			cct := sgType(c)
			if !strings.HasPrefix(cct, "multipart/") && cct != "text/plain" && cct != "text/html" {
				w.err = sgUnmappable("multipart/alternative has a " + cct + " alternative, which the SendGrid API cannot carry")
				return
			}
			w.walk(c, p, i, resource)
		}
	default:
		w.err = sgUnmappable(ct + " cannot be carried by the SendGrid API")
	}
}

// relatedRoot is the part named by the start parameter, else the first.
func relatedRoot(p *enmime.Part, children []*enmime.Part) *enmime.Part {
	if len(children) == 0 {
		return nil
	}
	if start := strings.Trim(p.ContentTypeParams["start"], "<> "); start != "" {
		for _, c := range children {
			if contentID(c) == start {
				return c
			}
		}
	}
	return children[0]
}

// contentID reads Content-ID as written, without the angle brackets. enmime's
// own ContentID is URL-unescaped, which would turn "+" into a space.
func contentID(p *enmime.Part) string {
	return strings.Trim(strings.TrimSpace(p.Header.Get("Content-Id")), "<>")
}

// sgBodyAndParts fills the content and attachments of base from the tree,
// and returns each attachment's decoded content.
func sgBodyAndParts(src *sgSource, root *enmime.Part, base *sgmail.SGMailV3) ([][]byte, error) {
	w := &sgWalker{}
	w.walk(root, nil, 0, false)
	if w.err != nil {
		return nil, w.err
	}
	var plain, html *sgBody
	for i := range w.bodies {
		b := &w.bodies[i]
		if sgType(b.part) == "text/plain" {
			if plain != nil {
				return nil, sgUnmappable("message has more than one text/plain body; SendGrid takes one")
			}
			plain = b
		} else {
			if html != nil {
				return nil, sgUnmappable("message has more than one text/html body; SendGrid takes one")
			}
			html = b
		}
	}
	if plain != nil && html != nil && (plain.alt == nil || plain.alt != html.alt || plain.branch == html.branch) {
		return nil, sgUnmappable("message has text/plain and text/html bodies that are not alternatives of each other")
	}
	for _, b := range []*sgBody{plain, html} {
		if b == nil {
			continue
		}
		if err := partDamage(b.part, true); err != nil {
			return nil, err
		}
		// An empty alternative is dropped: SendGrid refuses empty content.
		if len(b.part.Content) > 0 {
			base.Content = append(base.Content, &sgmail.Content{Type: sgType(b.part), Value: string(b.part.Content)})
		}
	}
	if len(base.Content) == 0 {
		return nil, sgUnmappable("message has no non-empty text/plain or text/html body; SendGrid requires one")
	}

	var raw map[string][]byte
	var parts [][]byte
	for i, p := range w.leaves {
		if err := partDamage(p, false); err != nil {
			return nil, err
		}
		content := p.Content
		if strings.HasPrefix(sgType(p), "text/") {
			// enmime converts text to UTF-8; an attachment must keep its bytes.
			if raw == nil {
				// Their converted copies are not needed: let them go first.
				for _, q := range w.leaves {
					if strings.HasPrefix(sgType(q), "text/") {
						q.Content = nil
					}
				}
				var err error
				if raw, err = rawLeaves(src.reader()); err != nil {
					return nil, sgUnmappable("cannot parse the MIME structure: " + oneLine(err.Error()))
				}
			}
			content = raw[p.PartID]
		}
		if len(content) == 0 {
			return nil, sgUnmappable("message has an empty attachment; SendGrid refuses empty attachment content")
		}
		parts = append(parts, content)
		a := &sgmail.Attachment{
			Type:        sgType(p),
			Filename:    p.FileName,
			Disposition: "attachment",
		}
		// SendGrid needs a content_id for inline parts; an inline part without
		// one is sent as an attachment.
		if cid := contentID(p); cid != "" && strings.ToLower(p.Disposition) != "attachment" {
			a.Disposition = "inline"
			a.ContentID = cid
		}
		if a.Filename == "" {
			a.Filename = syntheticFilename(a.Disposition, i+1, a.Type)
		}
		base.Attachments = append(base.Attachments, a)
	}
	return parts, nil
}

// partDamage reports a part whose decoded content would not be what the
// sender wrote: corrupt or unknown transfer encoding, and for text bodies an
// unknown charset.
func partDamage(p *enmime.Part, body bool) error {
	for _, e := range p.Errors {
		switch {
		case e.Severe, e.Name == enmime.ErrorContentEncoding,
			body && e.Name == enmime.ErrorCharsetConversion:
			return sgUnmappable("a MIME part cannot be decoded faithfully (" + e.Name + ")")
		}
	}
	if body && !utf8.Valid(p.Content) {
		return sgUnmappable("a text body is not valid UTF-8 after decoding its charset")
	}
	return nil
}

// rawLeaves returns the transfer-decoded bytes of every text leaf part by
// PartID, without enmime's charset conversion. Every leaf is decoded, so a
// broken one fails the same way; only the text ones are kept.
func rawLeaves(r io.Reader) (map[string][]byte, error) {
	root, err := enmime.NewParser(enmime.RawContent(true)).ReadParts(r)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	var walk func(p *enmime.Part) error
	walk = func(p *enmime.Part) error {
		for ; p != nil; p = p.NextSibling {
			if p.FirstChild != nil {
				if err := walk(p.FirstChild); err != nil {
					return err
				}
				continue
			}
			b, err := decodeTransfer(p.Header.Get("Content-Transfer-Encoding"), p.Content)
			if err != nil {
				return err
			}
			if strings.HasPrefix(sgType(p), "text/") {
				out[p.PartID] = b
			}
		}
		return nil
	}
	return out, walk(root)
}

func decodeTransfer(cte string, b []byte) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(cte)) {
	case "base64":
		// b is the raw parse's own copy: filter it in place.
		clean := b[:0]
		for _, c := range b {
			if c != ' ' && c != '\t' && c != '\r' && c != '\n' && c != '=' {
				clean = append(clean, c)
			}
		}
		out := make([]byte, base64.RawStdEncoding.DecodedLen(len(clean)))
		n, err := base64.RawStdEncoding.Decode(out, clean)
		return out[:n], err
	case "quoted-printable":
		return io.ReadAll(quotedprintable.NewReader(bytes.NewReader(b)))
	}
	return b, nil
}

// syntheticFilename names a part that has none: SendGrid requires a filename.
func syntheticFilename(disposition string, n int, typ string) string {
	ext := map[string]string{
		"text/plain": ".txt", "text/html": ".html", "text/calendar": ".ics", "text/csv": ".csv",
		"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
		"image/svg+xml": ".svg", "application/pdf": ".pdf", "application/zip": ".zip",
		"message/rfc822": ".eml", "application/json": ".json", "application/xml": ".xml",
	}[typ]
	if ext == "" {
		if exts, _ := mime.ExtensionsByType(typ); len(exts) > 0 {
			ext = exts[0]
		} else {
			ext = ".bin"
		}
	}
	base := "attachment"
	if disposition == "inline" {
		base = "inline"
	}
	return fmt.Sprintf("%s-%d%s", base, n, ext)
}

// sgStrings lists every string of base that goes into the JSON body, for the
// UTF-8 check: encoding/json would silently replace invalid bytes.
func sgStrings(base *sgmail.SGMailV3) []string {
	out := []string{base.Subject, base.From.Name, base.From.Address}
	if base.ReplyTo != nil {
		out = append(out, base.ReplyTo.Name)
	}
	for _, e := range base.ReplyToList {
		out = append(out, e.Name)
	}
	for _, a := range base.Attachments {
		out = append(out, a.Filename, a.Type, a.ContentID)
	}
	for k, v := range base.Headers {
		out = append(out, k, v)
	}
	return out
}
