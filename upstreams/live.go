package upstreams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sendgrid/rest"
	"github.com/sendgrid/sendgrid-go"
)

// LiveChecker is implemented by upstreams that can prove their endpoint,
// credentials and account state without sending mail (`relaycar check
// --live`). CheckLive returns a short summary of what it saw, or the
// problem as an *Error whose reason holds no secret.
type LiveChecker interface {
	CheckLive(ctx context.Context) (string, error)
}

// liveMaxTimeout bounds one upstream's live check: a check that hangs for
// longer than this has found its problem.
const liveMaxTimeout = 10 * time.Second

// CheckLive checks the upstream of c without sending mail, bounded by its
// timeout (at most 10 s). The file type is checked without building the
// adapter, which would create its directory. Whatever comes back is
// redacted once more with c's own secrets, so no path can print one.
func CheckLive(ctx context.Context, c Config, d Deps) (string, error) {
	c.ApplyDefaults()
	timeout := min(c.Timeout, liveMaxTimeout)
	if timeout <= 0 {
		timeout = liveMaxTimeout
	}
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, apiTimeoutCause(timeout))
	defer cancel()
	secrets := []Secret{c.AccessKeyID, c.SecretAccessKey, c.APIKey, c.Password, c.ClientSecret,
		c.OAuth2.ClientSecret, c.OAuth2.RefreshToken, c.OAuth2.ServiceAccountKey}
	var (
		detail string
		err    error
	)
	if c.Type == string(kindFile) {
		detail, err = checkDirWritable(c.Name, c.Dir)
	} else {
		detail, err = checkBuilt(ctx, c, d)
	}
	detail = apiRedact(detail, secrets...)
	var e *Error
	switch {
	case err == nil:
	case errors.As(err, &e):
		cp := *e
		cp.Reason = apiRedact(cp.Reason, secrets...)
		err = &cp
	default:
		err = errors.New(apiRedact(oneLine(err.Error()), secrets...))
	}
	return detail, err
}

func checkBuilt(ctx context.Context, c Config, d Deps) (string, error) {
	u, err := build(c, d)
	if err != nil {
		return "", err
	}
	if cl, ok := u.(Closer); ok {
		defer cl.Close()
	}
	lc, ok := u.(LiveChecker)
	if !ok {
		return "no live check for type " + c.Type, nil
	}
	return lc.CheckLive(ctx)
}

// liveProblem is a problem found by a live check that is no failed call:
// the account cannot send as configured.
func liveProblem(upstream, format string, args ...any) *Error {
	return errorf(upstream, ProviderFault, "", nil, format, args...)
}

// CheckLive reads the account with GetAccount. A paused or shut-down
// account and a used-up 24-hour quota are problems; the sandbox is not
// (it is a legitimate state for staging) but the summary says so first.
func (s *sesUpstream) CheckLive(ctx context.Context) (string, error) {
	q, err := s.Quota(ctx)
	if err != nil {
		return "", err
	}
	switch {
	case !q.SendingEnabled:
		return "", liveProblem(s.name, "sending is disabled for this SES account (paused by AWS or by the account)")
	case strings.EqualFold(q.Enforcement, "SHUTDOWN"):
		return "", liveProblem(s.name, "SES enforcement status is SHUTDOWN: the account cannot send")
	case q.Exhausted(0):
		return "", liveProblem(s.name, "24-hour quota used up: %s of %s sent", fmtCount(q.SentLast24Hours), fmtCount(q.Max24HourSend))
	}
	var parts []string
	if q.Sandbox {
		parts = append(parts, "sandbox: only verified recipients")
	} else {
		parts = append(parts, "production access")
	}
	if q.MaxSendRate > 0 {
		parts = append(parts, "max "+fmtCount(q.MaxSendRate)+"/s")
	}
	if q.Unlimited24h() {
		parts = append(parts, "no 24-hour quota")
	} else {
		parts = append(parts, fmt.Sprintf("%s of %s sent in 24 h", fmtCount(q.SentLast24Hours), fmtCount(q.Max24HourSend)))
	}
	if q.Enforcement != "" && !strings.EqualFold(q.Enforcement, "HEALTHY") {
		parts = append(parts, "enforcement "+q.Enforcement)
	}
	return strings.Join(parts, ", "), nil
}

func fmtCount(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// CheckLive lists the key's scopes (GET /v3/scopes, which any key may
// call for itself) and requires mail.send among them.
func (s *sendGridUpstream) CheckLive(ctx context.Context) (string, error) {
	ctx, progress := apiTrace(ctx)
	req := sendgrid.GetRequest(s.key.Reveal(), "/v3/scopes", s.host)
	req.Method = rest.Get
	hreq, err := rest.BuildRequestObject(req)
	if err != nil {
		return "", &Error{Upstream: s.name, Class: ProviderFault, Reason: "endpoint: cannot build the request"}
	}
	resp, err := s.client.HTTPClient.Do(hreq.WithContext(ctx))
	if err != nil {
		return "", apiTransportError(ctx, s.name, err, progress, s.key)
	}
	defer apiDrainClose(resp.Body)
	raw, rerr := io.ReadAll(resp.Body)
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		if rerr != nil {
			raw = []byte(apiUnreadable(rerr))
		}
		return "", s.statusError(&rest.Response{StatusCode: resp.StatusCode, Body: string(raw), Headers: resp.Header})
	}
	var body struct {
		Scopes []string `json:"scopes"`
	}
	if rerr != nil || json.Unmarshal(raw, &body) != nil {
		return "", liveProblem(s.name, "HTTP %d from /v3/scopes without a scope list", resp.StatusCode)
	}
	if !slices.Contains(body.Scopes, "mail.send") {
		return "", liveProblem(s.name, "the API key is valid but lacks the mail.send scope (%d scopes)", len(body.Scopes))
	}
	return "key valid, mail.send scope", nil
}

// CheckLive reads the sending domain (GET /v4/domains/{domain}). A
// domain sending key, which Mailgun recommends for sending, may only POST
// messages and is refused that read; then an empty messages.mime request
// (no recipient, no message: nothing that can be sent) tells a valid key,
// refused as incomplete (400), from a bad one (401/403).
func (g *mailgunUpstream) CheckLive(ctx context.Context) (string, error) {
	pctx, progress := apiTrace(ctx)
	resp, err := g.client.GetDomain(pctx, g.domain, nil)
	if err != nil {
		e := g.classify(pctx, err, progress)
		switch e.Code {
		case "401", "403":
			if g.sendingKeyValid(ctx) {
				return "domain sending key valid (it may not read the domain, so its state is not shown)", nil
			}
		case "404":
			e.Reason += " (domain " + g.domain + " is not in this account, or in the other region: see region)"
		}
		if e.Class == Ambiguous {
			e.Class = Transient // a read cannot have sent anything
		}
		return "", e
	}
	d := resp.Domain
	switch {
	case d.IsDisabled || d.State == "disabled":
		return "", liveProblem(g.name, "Mailgun domain %s is disabled", g.domain)
	case d.State != "" && d.State != "active":
		return "", liveProblem(g.name, "Mailgun domain %s is %s: its DNS records are not verified", g.domain, oneLine(truncate(d.State, 40)))
	}
	detail := "key valid, domain " + g.domain + " active"
	if d.Type == "sandbox" {
		detail += ", sandbox domain: only authorized recipients"
	}
	return detail, nil
}

// sendingKeyValid posts an empty multipart form to messages.mime: Mailgun
// checks the key before the parameters, so 400 means the key was taken.
func (g *mailgunUpstream) sendingKeyValid(ctx context.Context) bool {
	const boundary = "relaycar-live-check"
	u := strings.TrimRight(g.client.APIBase(), "/") + "/v3/" + url.PathEscape(g.domain) + "/messages.mime"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader("--"+boundary+"--\r\n"))
	if err != nil {
		return false
	}
	req.Header.Set("Content-Type", "multipart/form-data; boundary="+boundary)
	req.SetBasicAuth("api", g.key.Reveal())
	resp, err := g.client.HTTPClient().Do(req)
	if err != nil {
		return false
	}
	apiDrainClose(resp.Body)
	return resp.StatusCode == http.StatusBadRequest
}

// smtp2goCycle is the answer of /v3/stats/email_cycle.
type smtp2goCycle struct {
	Data struct {
		CycleEnd       string  `json:"cycle_end"`
		CycleMax       float64 `json:"cycle_max"`
		CycleUsed      float64 `json:"cycle_used"`
		CycleRemaining float64 `json:"cycle_remaining"`
		Error          string  `json:"error"`
		ErrorCode      string  `json:"error_code"`
	} `json:"data"`
	Error     string `json:"error"`
	ErrorCode string `json:"error_code"`
}

// CheckLive reads the monthly allowance (POST /v3/stats/email_cycle), the
// cheapest authenticated read. A key refused only this endpoint is valid:
// SMTP2GO keys carry per-endpoint permissions, and sending is not this one.
func (s *smtp2goUpstream) CheckLive(ctx context.Context) (string, error) {
	ctx, progress := apiTrace(ctx)
	u := strings.TrimSuffix(s.url, "/email/mime") + "/stats/email_cycle"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader("{}"))
	if err != nil {
		return "", errorf(s.name, ProviderFault, "", nil, "endpoint: cannot build the request")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("X-Smtp2go-Api-Key", s.key.Reveal())
	resp, err := s.client.Do(req)
	if err != nil {
		return "", apiTransportError(ctx, s.name, err, progress, s.key)
	}
	defer apiDrainClose(resp.Body)
	raw, rerr := io.ReadAll(resp.Body)
	var r smtp2goCycle
	perr := json.Unmarshal(raw, &r)
	status := resp.StatusCode
	errCode, errText := r.ErrorCode, r.Error
	if errCode == "" && errText == "" {
		errCode, errText = r.Data.ErrorCode, r.Data.Error
	}
	if strings.Contains(errCode, "PERMISSION_DENIED") && status != http.StatusUnauthorized {
		return "key valid (it may not read stats, so the monthly allowance is not shown)", nil
	}
	if status < 200 || status > 299 || rerr != nil || perr != nil {
		class := classifyHTTP(status)
		if status >= 200 && status < 300 {
			class = Transient
		}
		reason := errText
		if reason == "" {
			reason = string(raw)
		}
		if rerr != nil {
			reason = apiUnreadable(rerr)
		}
		code := strconv.Itoa(status)
		if errCode != "" {
			code += " " + strings.TrimPrefix(errCode, "E_ApiResponseCodes.")
		}
		return "", &Error{Upstream: s.name, Class: class, Code: code,
			Reason: truncate(apiRedact(fmt.Sprintf("HTTP %d: %s", status, oneLine(reason)), s.key), 300)}
	}
	d := r.Data
	if d.CycleMax > 0 && d.CycleRemaining <= 0 {
		return "", liveProblem(s.name, "monthly allowance used up: %s of %s sent (cycle ends %s)",
			fmtCount(d.CycleUsed), fmtCount(d.CycleMax), oneLine(truncate(d.CycleEnd, 40)))
	}
	return fmt.Sprintf("key valid, %s of %s emails left this cycle", fmtCount(d.CycleRemaining), fmtCount(d.CycleMax)), nil
}

// CheckLive connects, greets, upgrades to TLS and authenticates exactly as
// a delivery does (tokens included), then QUITs before MAIL.
func (s *smtpUpstream) CheckLive(ctx context.Context) (string, error) {
	sc, err := s.dial(ctx)
	if err != nil {
		return "", err
	}
	defer sc.close()
	_ = sc.c.Quit() // the checks passed; a lost 221 says nothing
	parts := []string{"connected"}
	switch s.mode {
	case TLSStartTLS:
		parts = append(parts, "STARTTLS")
	case TLSImplicit:
		parts = append(parts, "implicit TLS")
	default:
		parts = append(parts, "no TLS")
	}
	switch {
	case s.username == "":
		parts = append(parts, "no AUTH configured")
	case s.auth != "":
		parts = append(parts, "AUTH "+strings.ToUpper(string(s.auth))+" as "+s.username)
	default:
		parts = append(parts, "AUTH as "+s.username)
	}
	return strings.Join(parts, ", "), nil
}

// CheckLive fetches an access token, which proves the tenant, client id
// and secret. Whether the app holds Mail.Send for the mailbox shows only
// when it sends.
func (g *msgraphUpstream) CheckLive(ctx context.Context) (string, error) {
	if _, _, err := g.tokens.token(ctx); err != nil {
		return "", err
	}
	return "token issued (Mail.Send for the mailbox cannot be checked without sending)", nil
}

// CheckLive checks the directory the way checkDirWritable does.
func (f *fileUpstream) CheckLive(context.Context) (string, error) {
	return checkDirWritable(f.name, f.dir)
}

// checkDirWritable proves dir takes a file by creating and removing one.
// A missing dir is fine when its nearest existing parent is writable: the
// relay creates it at start.
func checkDirWritable(upstream, dir string) (string, error) {
	at, missing := dir, false
	for {
		fi, err := os.Stat(at)
		if err == nil {
			if !fi.IsDir() {
				return "", liveProblem(upstream, "%s is not a directory", at)
			}
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return "", liveProblem(upstream, "dir: %v", err)
		}
		parent := filepath.Dir(at)
		if parent == at {
			return "", liveProblem(upstream, "dir: %v", err)
		}
		at, missing = parent, true
	}
	f, err := os.CreateTemp(at, ".relaycar-check-*")
	if err != nil {
		return "", liveProblem(upstream, "dir %s is not writable: %v", at, errors.Unwrap(err))
	}
	f.Close()
	os.Remove(f.Name())
	if missing {
		return "dir " + dir + " will be created at start", nil
	}
	return "dir " + dir + " writable", nil
}

var (
	_ LiveChecker = (*sesUpstream)(nil)
	_ LiveChecker = (*sendGridUpstream)(nil)
	_ LiveChecker = (*mailgunUpstream)(nil)
	_ LiveChecker = (*smtp2goUpstream)(nil)
	_ LiveChecker = (*smtpUpstream)(nil)
	_ LiveChecker = (*msgraphUpstream)(nil)
	_ LiveChecker = (*fileUpstream)(nil)
)
