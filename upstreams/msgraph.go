package upstreams

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Microsoft Graph defaults: the global cloud's API and token hosts.
const (
	msgraphDefaultEndpoint = "https://graph.microsoft.com"
	msgraphLoginHost       = "https://login.microsoftonline.com"
)

// msgraphMaxBytes is the largest raw message sent through Graph: sendMail
// takes a request of up to 4 MB, and the MIME message travels base64
// encoded (4/3), with room left for the Bcc header the adapter adds.
const msgraphMaxBytes = 3<<20 - 64<<10

// memFactorMSGraph: the raw message, its copy with a Bcc header and the
// base64 request body.
const memFactorMSGraph = 3

// msgraphUpstream sends through Microsoft Graph's sendMail with the raw MIME
// message (base64, Content-Type text/plain), as Microsoft recommends in
// place of SMTP AUTH for Exchange Online. Graph takes the recipients from
// the To, Cc and Bcc headers, as SMTP2GO does, so the copy gets a Bcc
// header naming envelope-only recipients.
type msgraphUpstream struct {
	name    string
	base    string
	sender  string
	tokens  *tokenSource
	client  *http.Client
	timeout time.Duration
	log     *slog.Logger
	mem     Memory
	now     func() time.Time
}

func newMSGraph(c Config, d Deps) (*msgraphUpstream, error) {
	base := msgraphDefaultEndpoint
	if c.Endpoint != "" {
		base = strings.TrimSuffix(strings.TrimRight(c.Endpoint, "/"), "/v1.0")
	}
	tokenURL := c.TokenURL
	if tokenURL == "" {
		tokenURL = msgraphLoginHost + "/" + url.PathEscape(c.TenantID) + "/oauth2/v2.0/token"
	}
	client := d.httpClient(c.Timeout)
	ts, err := newTokenSource(c.Name, OAuth2{TokenURL: tokenURL, ClientID: c.ClientID, ClientSecret: c.ClientSecret},
		"", []string{msgraphScope(base)}, client, d.now())
	if err != nil {
		return nil, err
	}
	if !c.SaveToSentItems {
		d.logger().Info("Graph keeps a copy of every message in the sender's Sent Items: sendMail with a MIME body has no saveToSentItems",
			"upstream", c.Name)
	}
	return &msgraphUpstream{name: c.Name, base: base, sender: c.Sender, tokens: ts, client: client,
		timeout: c.Timeout, log: d.logger(), mem: d.Memory, now: d.now()}, nil
}

// Name returns the configured name.
func (g *msgraphUpstream) Name() string { return g.name }

// msgraphScope asks for the application permissions of the Graph that
// base belongs to: a national cloud (graph.microsoft.us, ...) has its own
// resource. Any other base (a proxy, a test) is the global Graph's.
func msgraphScope(base string) string {
	if u, err := url.Parse(base); err == nil && (strings.HasPrefix(u.Host, "graph.microsoft.") ||
		strings.HasPrefix(u.Host, "dod-graph.microsoft.") || u.Host == "microsoftgraph.chinacloudapi.cn") {
		return "https://" + u.Host + "/.default"
	}
	return scopeGraph
}

// msgraphError is Graph's error body.
type msgraphError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// Send posts m to /users/{sender}/sendMail. Graph answers 202 without a
// body; the request-id header, when it has one, is the provider id. A 401
// to a cached token drops it and tries once more with a fresh one.
func (g *msgraphUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	if len(m.To) == 0 {
		return Receipt{}, errorf(g.name, Rejected, "", nil, "no recipients")
	}
	sender := g.sender
	if sender == "" {
		sender = m.From
	}
	if sender == "" {
		return Receipt{}, errorf(g.name, Unsupported, "", nil, "Graph sends as a mailbox and this message has the null sender; set sender")
	}
	data, release, err := loadBody(ctx, g.mem, g.name, m, memFactorMSGraph)
	if err != nil {
		return Receipt{}, err
	}
	defer release()
	ctx, cancel := context.WithTimeoutCause(ctx, g.timeout, apiTimeoutCause(g.timeout))
	defer cancel()
	named := headerRecipients(data)
	if dup := deliveredElsewhere(m, named); dup != "" {
		return Receipt{}, errorf(g.name, Unsupported, "", nil,
			"headers name %s, who is not part of this delivery; Graph mails every header recipient (use SMTP for split routes)", dup)
	}
	mime := withBccHeader(m, data, named)
	body := make([]byte, base64.StdEncoding.EncodedLen(len(mime)))
	base64.StdEncoding.Encode(body, mime)
	u := g.base + "/v1.0/users/" + url.PathEscape(sender) + "/sendMail"
	for attempt := 1; ; attempt++ {
		tok, fresh, err := g.tokens.token(ctx)
		if err != nil {
			return Receipt{}, err
		}
		id, status, err := g.post(ctx, u, tok, body, m, sender)
		if status == http.StatusUnauthorized && attempt == 1 && !fresh {
			g.tokens.Invalidate(tok)
			continue
		}
		return Receipt{ProviderID: id}, err
	}
}

// post makes one sendMail request and classes its answer.
func (g *msgraphUpstream) post(ctx context.Context, u, tok string, body []byte, m *Message, sender string) (string, int, error) {
	ctx, progress := apiTrace(ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return "", 0, errorf(g.name, ProviderFault, "", nil, "endpoint: cannot build the request")
	}
	req.Header.Set("Content-Type", "text/plain")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := g.client.Do(req)
	if err != nil {
		return "", 0, apiTransportError(ctx, g.name, err, progress, Secret(tok))
	}
	defer apiDrainClose(resp.Body)
	status := resp.StatusCode
	if status >= 200 && status < 300 {
		id := resp.Header.Get("request-id")
		g.log.Debug("graph accepted message", "upstream", g.name, "msg_id", m.ID, "provider_id", id, "rcpt_count", len(m.To))
		return id, status, nil
	}
	raw, _ := io.ReadAll(resp.Body)
	var ge msgraphError
	_ = json.Unmarshal(raw, &ge) // an unparsed body leaves the status to class by
	code := ge.Error.Code
	secrets := append(g.tokens.Secrets(), Secret(tok))
	reason := "HTTP " + strconv.Itoa(status)
	if code != "" {
		reason += " " + redactCut(code, 80, secrets...)
	}
	if msg := ge.Error.Message; msg != "" {
		reason += ": " + redactCut(msg, 200, secrets...)
	} else if code == "" && len(raw) > 0 {
		reason += ": " + apiBodyReason(raw, secrets...)
	}
	class := classifyHTTP(status)
	switch {
	case status == http.StatusUnauthorized:
		reason += " (the token was refused: check the app registration's secret, tenant and Mail.Send permission)"
	case code == "ErrorSendAsDenied" || status == http.StatusNotFound:
		// The mailbox is the message's sender unless sender is set: then
		// it is this sender that cannot send here, not the upstream.
		if g.sender == "" {
			class = SenderRejected
		}
		reason += " (mailbox " + sender + ")"
	case status == http.StatusForbidden && strings.Contains(ge.Error.Message, "AccessPolicy"):
		// An Exchange application access policy leaves this mailbox out
		// (New-ApplicationAccessPolicy): other mailboxes still send.
		if g.sender == "" {
			class = SenderRejected
		}
		reason += " (mailbox " + sender + " is outside the app's application access policy)"
	case status == http.StatusForbidden:
		reason += " (the app needs the Mail.Send application permission with admin consent)"
	case status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable:
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			reason += " (Retry-After " + oneLine(truncate(ra, 40)) + ")"
		}
	}
	e := errorf(g.name, class, strconv.Itoa(status), nil, "%s", reason)
	// Microsoft: wait as long as Retry-After says; retrying sooner counts
	// against the limit.
	e.RetryAt = httpRetryAt(status, resp.Header, g.now())
	return "", status, e
}

var _ Upstream = (*msgraphUpstream)(nil)
