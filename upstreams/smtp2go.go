package upstreams

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"

	"github.com/relaycar/relaycar/internal/mailhdr"
)

// smtp2goDefaultEndpoint is the global API host; it routes to the nearest
// region (us-api., eu-api., au-api.smtp2go.com can be set as endpoint).
const smtp2goDefaultEndpoint = "https://api.smtp2go.com"

// smtp2goUpstream sends raw MIME through SMTP2GO's /v3/email/mime API. That API has
// no envelope parameter: SMTP2GO delivers to the addresses in the To, Cc and
// Bcc headers. So the copy sent to SMTP2GO gets a Bcc: header naming the
// envelope recipients that no such header names. Header recipients that are
// not envelope recipients cannot be left out (docs/providers.md).
type smtp2goUpstream struct {
	name    string
	url     string
	key     Secret
	client  *http.Client
	timeout time.Duration
	log     *slog.Logger
	mem     Memory
	now     func() time.Time
}

func newSMTP2GO(c Config, d Deps) (*smtp2goUpstream, error) {
	timeout := c.Timeout
	base := smtp2goDefaultEndpoint
	if c.Endpoint != "" {
		base = c.Endpoint
	}
	// SMTP2GO documents its base URLs with the version ("…/v3"); accept both.
	base = strings.TrimSuffix(strings.TrimRight(base, "/"), "/v3")
	return &smtp2goUpstream{
		name: c.Name, url: base + "/v3/email/mime", key: c.APIKey,
		client: d.httpClient(timeout), timeout: timeout, log: d.logger(), mem: d.Memory, now: d.now(),
	}, nil
}

// Name returns the configured name.
func (s *smtp2goUpstream) Name() string { return s.name }

// smtp2goResponse covers both answers: success in data, errors either in
// data or at the top level.
type smtp2goResponse struct {
	RequestID string `json:"request_id"`
	Data      struct {
		Succeeded int               `json:"succeeded"`
		Failed    int               `json:"failed"`
		Failures  []json.RawMessage `json:"failures"`
		EmailID   string            `json:"email_id"`
		Error     string            `json:"error"`
		ErrorCode string            `json:"error_code"`
	} `json:"data"`
	Error     string `json:"error"`
	ErrorCode string `json:"error_code"`
}

// Send posts m (plus the Bcc header, see SMTP2GO) and returns data.email_id.
func (s *smtp2goUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	if len(m.To) == 0 {
		return Receipt{}, errorf(s.name, Rejected, "", nil, "no recipients")
	}
	// Memory first: waiting for it is not the provider's time, and must
	// not eat the timeout of the request itself.
	data, release, err := loadBody(ctx, s.mem, s.name, m, memFactorSMTP2GO)
	if err != nil {
		return Receipt{}, err
	}
	ctx, cancel := context.WithTimeoutCause(ctx, s.timeout, apiTimeoutCause(s.timeout))
	defer cancel()
	ctx, progress := apiTrace(ctx)
	defer release()
	named := headerRecipients(data)
	if dup := deliveredElsewhere(m, named); dup != "" {
		// SMTP2GO mails every address in the headers. This delivery covers
		// only part of the message's recipients (a route split, or a retry
		// after a partial delivery), so it would mail dup a second time.
		return Receipt{}, errorf(s.name, Unsupported, "", nil,
			"headers name %s, who is not part of this delivery; SMTP2GO's API would mail them again (use its SMTP endpoint for split routes)", dup)
	}
	mime := withBccHeader(m, data, named)
	// {"mime_email":"<base64>"} written directly: base64 needs no JSON
	// escaping, and a 25 MB message is not copied three more times.
	const pre, post = `{"mime_email":"`, `"}`
	body := make([]byte, len(pre)+base64.StdEncoding.EncodedLen(len(mime))+len(post))
	copy(body, pre)
	base64.StdEncoding.Encode(body[len(pre):], mime)
	copy(body[len(body)-len(post):], post)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return Receipt{}, errorf(s.name, ProviderFault, "", nil, "endpoint: cannot build the request")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("X-Smtp2go-Api-Key", s.key.Reveal())
	resp, err := s.client.Do(req)
	if err != nil {
		return Receipt{}, apiTransportError(ctx, s.name, err, progress, s.key)
	}
	defer apiDrainClose(resp.Body)
	// The client's transport bounds the body and fails past the bound, so
	// a huge answer is an error here, never a truncated one that parses.
	raw, rerr := io.ReadAll(resp.Body)
	status := resp.StatusCode
	code := strconv.Itoa(status)

	var r smtp2goResponse
	perr := json.Unmarshal(raw, &r)
	if status >= 200 && status < 300 {
		switch {
		case rerr != nil:
			return Receipt{}, errorf(s.name, Ambiguous, code, rerr, "unreadable success response: %s", apiUnreadable(rerr))
		case perr != nil:
			return Receipt{}, errorf(s.name, Ambiguous, code, nil, "unreadable success response: %s", apiBodyReason(raw, s.key))
		case r.Data.Failed > 0:
			return s.failed(m, &r)
		case r.Data.EmailID == "":
			return Receipt{}, errorf(s.name, Ambiguous, code, nil, "success without email_id: %s", apiBodyReason(raw, s.key))
		}
		s.log.Debug("smtp2go accepted message", "upstream", s.name, "msg_id", m.ID, "provider_id", r.Data.EmailID, "rcpt_count", len(m.To))
		return Receipt{ProviderID: r.Data.EmailID}, nil
	}

	class := classifyHTTP(status)
	errCode, errText := r.ErrorCode, r.Error
	if errCode == "" && errText == "" {
		errCode, errText = r.Data.ErrorCode, r.Data.Error
	}
	if status == http.StatusBadRequest {
		// 400 is "bad parameter", but SMTP2GO also answers 400 for a key
		// without the send permission (ENDPOINT_PERMISSION_DENIED) and for
		// unverified senders; those are not the message's fault.
		if c, ok := smtp2goTextClass(errCode + " " + errText); ok {
			class = c
		}
	}
	if errCode != "" {
		code += " " + strings.TrimPrefix(errCode, "E_ApiResponseCodes.")
	}
	reason := errText
	if reason == "" {
		reason = string(raw)
	}
	if rerr != nil {
		// The status is the answer; the body only lost its detail.
		reason = apiUnreadable(rerr)
	}
	// SMTP2GO documents no rate-limit headers: a 429 without any pauses
	// for retryAfter's default; one it may send is honoured.
	return Receipt{}, &Error{Upstream: s.name, Class: class, Code: code,
		Reason:  truncate(apiRedact(fmt.Sprintf("HTTP %d: %s", status, oneLine(reason)), s.key), 300),
		RetryAt: httpRetryAt(status, resp.Header, s.now())}
}

// failed turns a 200 with data.failed > 0 into an error or a partial
// delivery.
//
// The class comes from the failures text when it says something clear
// (sender not verified, key or account problem, rate limit). Otherwise it
// depends on which envelope recipients the failures name:
//   - none: Transient. An unexplained failure is retried (and fails over)
//     rather than dead-lettered: wrongly calling it transient costs a retry,
//     wrongly calling it rejected loses mail.
//   - all of them: Rejected; the provider refused the addresses.
//   - some, and others succeeded: a partial delivery (email_id), the
//     named ones refused as Rejected.
//   - some, and nothing succeeded: Transient, so the next upstream can
//     deliver to the others; dead-lettering all would lose good recipients.
//
// When the failures name nobody but something succeeded, the whole message
// is retried, which may repeat it for those recipients (at-least-once).
func (s *smtp2goUpstream) failed(m *Message, r *smtp2goResponse) (Receipt, error) {
	texts := make([]string, 0, len(r.Data.Failures))
	for _, f := range r.Data.Failures {
		var str string
		if json.Unmarshal(f, &str) == nil {
			texts = append(texts, str)
		} else {
			texts = append(texts, string(f))
		}
	}
	all := strings.Join(texts, "; ")
	var named []string
	distinct := map[string]bool{}
	for _, rcpt := range m.To {
		k := strings.ToLower(rcpt)
		if rcpt == "" || distinct[k] {
			continue
		}
		distinct[k] = true
		if containsAddress(all, rcpt) {
			named = append(named, rcpt)
		}
	}
	partial := r.Data.Succeeded > 0 && len(named) > 0 && len(named) < len(distinct)
	class, ok := smtp2goTextClass(all)
	if !ok {
		switch {
		case len(named) == len(distinct), partial:
			class = Rejected
		default:
			class = Transient
		}
	}
	e := &Error{Upstream: s.name, Class: class, Code: "200 failed",
		Reason: truncate(apiRedact(fmt.Sprintf("%d failed, %d succeeded: %s", r.Data.Failed, r.Data.Succeeded, oneLine(all)), s.key), 300)}
	if partial {
		return Receipt{ProviderID: r.Data.EmailID, Refused: refuse(named, e)}, nil
	}
	return Receipt{}, e
}

// containsAddress reports whether addr occurs in text as a whole address
// (case-insensitively), so "a@x.com" is not found inside "ba@x.com".
func containsAddress(text, addr string) bool {
	t, a := strings.ToLower(text), strings.ToLower(addr)
	for off := 0; ; {
		i := strings.Index(t[off:], a)
		if i < 0 {
			return false
		}
		start, end := off+i, off+i+len(a)
		if (start == 0 || !isAddrByte(t[start-1])) && (end == len(t) || !isAddrByte(t[end]) || t[end] == '.' && (end+1 == len(t) || !isAddrByte(t[end+1]))) {
			return true
		}
		off = start + 1
	}
}

// isAddrByte reports bytes that can continue an address on either side.
func isAddrByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		strings.IndexByte("!#$%&'*+-/=?^_`{|}~.@", c) >= 0 || c >= 0x80
}

// smtp2goTextClass recognises the few failure texts that say whose fault it
// is. ok is false when the text says nothing clear.
func smtp2goTextClass(text string) (Class, bool) {
	t := strings.ToLower(text)
	switch {
	case strings.Contains(t, "permission_denied"), strings.Contains(t, "api key"), strings.Contains(t, "api_key"),
		strings.Contains(t, "suspended"), strings.Contains(t, "disabled"):
		return ProviderFault, true
	case strings.Contains(t, "sender") && (strings.Contains(t, "not verified") || strings.Contains(t, "unverified")):
		return SenderRejected, true
	case strings.Contains(t, "rate limit"), strings.Contains(t, "too many"), strings.Contains(t, "try again"),
		strings.Contains(t, "temporar"):
		return Transient, true
	}
	return 0, false
}

// withBccHeader returns the bytes sent to the providers that mail every header
// recipient (SMTP2GO, Graph): data (m's body) with, when needed,
// the envelope recipients absent from the To, Cc and Bcc headers added to
// the Bcc header (one Bcc field: a second one may be ignored downstream).
// data itself is never modified.
func withBccHeader(m *Message, data []byte, named map[string]bool) []byte {
	var extra []string
	seen := map[string]bool{}
	for _, rcpt := range m.To {
		k := strings.ToLower(rcpt)
		if rcpt == "" || named[k] || seen[k] {
			continue
		}
		seen[k] = true
		extra = append(extra, rcpt)
	}
	if len(extra) == 0 {
		return data
	}
	// The header section ends where the relay's does (mailhdr.Split).
	hdr, bodyOff := mailhdr.Split(data)
	hr := bytes.NewReader(hdr)
	br := bufio.NewReader(hr)
	h, err := textproto.ReadHeader(br)
	if (err != nil && !errors.Is(err, io.EOF)) || hr.Len()+br.Buffered() != 0 {
		// Not a header the parser takes whole (or none): everything is
		// body, behind the new Bcc field.
		h, bodyOff = textproto.Header{}, 0
	}
	bcc := extra
	if old := h.Values("Bcc"); len(old) > 0 {
		bcc = append(old, extra...)
		h.Del("Bcc")
	}
	// One address per folded line keeps every line far below 998.
	h.AddRaw([]byte("Bcc: " + strings.Join(bcc, ",\r\n ") + "\r\n"))
	var b bytes.Buffer
	b.Grow(len(data) + 8 + len(extra)*42)
	textproto.WriteHeader(&b, h)
	b.Write(data[bodyOff:])
	return b.Bytes()
}

// deliveredElsewhere returns a header recipient of m that is an envelope
// recipient of the message but not of this delivery, or "".
func deliveredElsewhere(m *Message, named map[string]bool) string {
	this := map[string]bool{}
	for _, r := range m.To {
		this[strings.ToLower(r)] = true
	}
	for _, r := range m.AllRcpts {
		if k := strings.ToLower(r); named[k] && !this[k] {
			return r
		}
	}
	return ""
}

// headerRecipients returns the lower-cased addresses named in the To, Cc
// and Bcc headers of data (its header section as mailhdr.Split finds it). Whatever does not parse counts as not named: the
// worst case is then a recipient listed twice, never one left out.
func headerRecipients(data []byte) map[string]bool {
	named := map[string]bool{}
	hdr, _ := mailhdr.Split(data)
	msg, err := mail.ReadMessage(bytes.NewReader(hdr))
	if err != nil {
		return named
	}
	// Display names are irrelevant here; decode unknown charsets as-is
	// rather than failing the whole list.
	p := mail.AddressParser{WordDecoder: &mime.WordDecoder{
		CharsetReader: func(_ string, r io.Reader) (io.Reader, error) { return r, nil },
	}}
	for _, h := range []string{"To", "Cc", "Bcc"} {
		for _, v := range msg.Header[h] {
			list, err := p.ParseList(v)
			if err != nil {
				// One bad entry fails the list; try the entries one by one.
				list = nil
				for part := range strings.SplitSeq(v, ",") {
					if a, err := p.Parse(part); err == nil {
						list = append(list, a)
					}
				}
			}
			for _, a := range list {
				named[strings.ToLower(a.Address)] = true
			}
		}
	}
	return named
}

var _ Upstream = (*smtp2goUpstream)(nil)
