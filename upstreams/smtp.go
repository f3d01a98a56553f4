package upstreams

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/internal/errreader"
)

// smtpUpstream relays through an SMTP smarthost (or an ESP's SMTP endpoint).
type smtpUpstream struct {
	name     string
	addr     string
	mode     TLSMode
	tls      *tls.Config
	username string
	password Secret
	auth     AuthMode
	tokens   *tokenSource // nil unless auth is xoauth2 or oauthbearer
	timeout  time.Duration
	helo     string
	dialer   net.Dialer
	now      func() time.Time

	// maxIdle: one per delivery that may run at once, so that a busy
	// spool does not close and redial connections on every burst.
	maxIdle int

	mu     sync.Mutex
	idle   []*smtpConn
	closed bool

	// bufs are io.Copy's 32 KiB buffers, reused: half of what a 2 KB
	// message allocated on its way through relaycar was this one.
	bufs sync.Pool
}

func (s *smtpUpstream) copyBuf() *[]byte {
	if b, ok := s.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 32<<10)
	return &b
}

func newSMTP(c Config, d Deps) (*smtpUpstream, error) {
	host, _, _ := net.SplitHostPort(c.Address) // Validate checked the form
	tc := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem := c.CA
		if pem == nil { // a Config that did not go through ResolveSecrets
			var err error
			if pem, err = os.ReadFile(c.CAFile); err != nil {
				return nil, fmt.Errorf("ca_file: %v", err)
			}
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file: no PEM certificates in %s", c.CAFile)
		}
		tc.RootCAs = pool
	}
	helo := d.Hostname
	if helo == "" {
		helo = "localhost"
	}
	s := &smtpUpstream{
		name: c.Name, addr: c.Address, mode: c.TLS, tls: tc,
		username: c.Username, password: c.Password, auth: c.Auth, timeout: c.Timeout,
		helo: helo, dialer: net.Dialer{Timeout: c.Timeout}, now: d.now(),
		maxIdle: max(d.Deliveries, smtpMinIdle),
	}
	if c.Auth == AuthXOAuth2 || c.Auth == AuthOAuthBearer {
		ts, err := newTokenSource(c.Name, c.OAuth2, c.Username, smtpOAuthScopes(c.OAuth2), d.httpClient(c.Timeout), d.now())
		if err != nil {
			return nil, err
		}
		s.tokens = ts
	}
	return s, nil
}

// Name returns the configured name.
func (s *smtpUpstream) Name() string { return s.name }

// smtpPhase names where an exchange failed; the same reply code means
// different things at MAIL, RCPT and DATA.
type smtpPhase string

const (
	phaseConnect smtpPhase = "connect"
	phaseHello   smtpPhase = "hello"
	phaseAuth    smtpPhase = "auth"
	phaseMail    smtpPhase = "mail"
	phaseRcpt    smtpPhase = "rcpt"
	phaseData    smtpPhase = "data"
	// phaseDataEnd is after the final "." was written: a lost reply here may
	// mean the upstream took the message.
	phaseDataEnd smtpPhase = "data_end"
)

// Send delivers m in one SMTP transaction. Recipients refused at RCPT while
// others were accepted are reported in Receipt.Refused; the rest are
// delivered. A connection left idle by an earlier successful transaction is
// reused (as Postfix's connection cache does); if it turns out to be dead
// before the message went out, the transaction is retried once on a fresh
// connection, so a stale connection never counts as an upstream failure.
func (s *smtpUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, s.timeout, apiTimeoutCause(s.timeout))
	defer cancel()
	if sc := s.takeIdle(); sc != nil {
		rc, stale, err := s.transact(ctx, sc, m)
		if !stale {
			return rc, err
		}
	}
	sc, err := s.dial(ctx)
	if err != nil {
		return Receipt{}, err
	}
	rc, _, err := s.transact(ctx, sc, m)
	return rc, err
}

// smtpConn is an open, greeted (and authenticated) upstream connection.
type smtpConn struct {
	conn net.Conn
	c    *smtp.Client
	idle time.Time
}

func (sc *smtpConn) close() {
	sc.c.Close()
	sc.conn.Close()
}

// dial connects, greets, upgrades to TLS and authenticates.
func (s *smtpUpstream) dial(ctx context.Context) (*smtpConn, error) {
	conn, err := s.dialer.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, s.fail(ctx, phaseConnect, err)
	}
	// Closing the connection when ctx ends unblocks any read or write.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	sc, err := s.handshake(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return sc, nil
}

func (s *smtpUpstream) handshake(ctx context.Context, conn net.Conn) (*smtpConn, error) {
	var (
		c   *smtp.Client
		err error
	)
	switch s.mode {
	case TLSImplicit:
		tconn := tls.Client(conn, s.tls)
		if err := tconn.HandshakeContext(ctx); err != nil {
			return nil, s.fail(ctx, phaseConnect, err)
		}
		conn = tconn
		c = smtp.NewClient(tconn)
	case TLSStartTLS:
		// The pre-TLS EHLO says "localhost"; go-smtp offers no other way in.
		c, err = smtp.NewClientStartTLS(conn, s.tls)
		if err != nil {
			if strings.Contains(err.Error(), "doesn't support STARTTLS") {
				// Never fall back to plaintext: that would send credentials
				// and mail in the clear to a misconfigured or tampered peer.
				return nil, errorf(s.name, ProviderFault, "", err, "server does not offer STARTTLS and tls is starttls")
			}
			return nil, s.fail(ctx, phaseHello, err)
		}
	default:
		c = smtp.NewClient(conn)
	}
	c.CommandTimeout, c.SubmissionTimeout = s.timeout, s.timeout
	if err := c.Hello(s.helo); err != nil {
		c.Close()
		return nil, s.fail(ctx, phaseHello, err)
	}
	if err := s.authenticate(ctx, c); err != nil {
		c.Close()
		return nil, err
	}
	return &smtpConn{conn: conn, c: c}, nil
}

// transact runs MAIL, RCPT and DATA on sc. It keeps sc for reuse after a
// clean success and closes it otherwise. stale reports that a reused
// connection failed before anything of the message was accepted, so the
// caller may retry on a fresh one.
func (s *smtpUpstream) transact(ctx context.Context, sc *smtpConn, m *Message) (rc Receipt, stale bool, err error) {
	reused := !sc.idle.IsZero()
	stop := context.AfterFunc(ctx, func() { sc.conn.Close() })
	keep := false
	defer func() {
		if stop() && keep {
			s.putIdle(sc)
		} else {
			sc.close()
		}
	}()
	c := sc.c
	// A connection the server closed while idle fails at MAIL with an I/O
	// error or a 421; neither says anything about this message.
	isStale := func(err error) bool {
		var se *smtp.SMTPError
		return reused && ctx.Err() == nil && (!errors.As(err, &se) || se.Code == 421)
	}
	if e := s.cannotCarry(c, m); e != nil {
		// Nothing was sent: the connection stays clean for the next message.
		keep = true
		return Receipt{}, false, e
	}
	opts := &smtp.MailOptions{Size: m.size(), UTF8: needsUTF8(m)}
	// MAIL, the RCPTs and DATA in one write where the server offers
	// PIPELINING (go-smtp's MailRcptData, carried in third_party): two
	// round trips a message instead of three plus one per recipient.
	rcptErrs, w, err := c.MailRcptData(m.From, opts, m.To, nil)
	if err != nil && rcptErrs == nil {
		// MAIL's reply, or the connection failed before it: no transaction.
		return Receipt{}, isStale(err), s.fail(ctx, phaseMail, err)
	}
	var refused []string
	var firstRcptErr, tempRcptErr error
	for i, rerr := range rcptErrs {
		if rerr == nil {
			continue
		}
		var se *smtp.SMTPError
		if !errors.As(rerr, &se) {
			// The connection failed after MAIL was accepted: not stale.
			return Receipt{}, false, s.fail(ctx, phaseRcpt, rerr)
		}
		refused = append(refused, m.To[i])
		if firstRcptErr == nil {
			firstRcptErr = rerr
		}
		if classifySMTP(phaseRcpt, se.Code) == Transient && tempRcptErr == nil {
			tempRcptErr = rerr
		}
	}
	if errors.Is(err, smtp.ErrNoRecipients) {
		// A greylisting 4xx beside a 5xx: retry all rather than dead-letter
		// a recipient that would have been accepted later.
		if tempRcptErr != nil {
			return Receipt{}, false, s.fail(ctx, phaseRcpt, tempRcptErr)
		}
		return Receipt{}, false, s.fail(ctx, phaseRcpt, firstRcptErr)
	}
	if err != nil {
		return Receipt{}, false, s.fail(ctx, phaseData, err)
	}
	// Straight from the spool file to the socket: the message is never
	// whole in memory.
	src := &errreader.Reader{R: m.Reader()}
	buf := s.copyBuf()
	_, err = io.CopyBuffer(w, src, *buf)
	s.bufs.Put(buf)
	if err != nil {
		if src.Err != nil {
			// Ending DATA now would deliver a truncated message; dropping
			// the connection (transact's deferred close) makes the server
			// discard it.
			return Receipt{}, false, errorf(s.name, Transient, "", src.Err, "reading the spooled message: %v", src.Err)
		}
		w.Close()
		return Receipt{}, false, s.fail(ctx, phaseData, err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return Receipt{}, false, s.fail(ctx, phaseDataEnd, err)
	}
	if resp != nil {
		rc.ProviderID = resp.StatusText
	}
	if len(refused) > 0 {
		// Partially delivered: report only the refused recipients. If any was
		// refused temporarily, all refused ones are retried (a 5xx one will be
		// refused again and dead-lettered then).
		if tempRcptErr != nil {
			rc.Refused = refuse(refused, s.fail(ctx, phaseRcpt, tempRcptErr))
			return rc, false, nil
		}
		// Otherwise each by its own reply. The server took the others, so
		// a refusal that would blame it or the sender (a relay_domains
		// "relay access denied" for one domain) is about this recipient
		// here: another upstream may carry it, and no breaker counts it.
		for i, rerr := range rcptErrs {
			if rerr == nil {
				continue
			}
			e := s.fail(ctx, phaseRcpt, rerr)
			if e.Class == ProviderFault || e.Class == SenderRejected {
				e.Class = Unsupported
			}
			rc.Refused = append(rc.Refused, Refusal{Rcpt: m.To[i], Err: e})
		}
		return rc, false, nil
	}
	keep = true
	return rc, false, nil
}

// cannotCarry checks m against what the server said in EHLO, before MAIL.
// go-smtp would refuse a UTF-8 envelope without SMTPUTF8 with a plain error
// (which reads as a broken upstream: transient, counted by the breaker,
// retried until max_age), and a server refuses a message above its SIZE.
// Both are this upstream's limits for this message: Unsupported, so the
// route fails over and the breaker is untouched. A CR or LF in an address
// can be carried by no SMTP server: Rejected.
func (s *smtpUpstream) cannotCarry(c *smtp.Client, m *Message) *Error {
	for _, a := range append([]string{m.From}, m.To...) {
		if strings.ContainsAny(a, "\r\n") {
			return errorf(s.name, Rejected, "", nil, "envelope address contains CR or LF")
		}
	}
	if needsUTF8(m) {
		if ok, _ := c.Extension("SMTPUTF8"); !ok {
			who := "recipient"
			if !IsASCII(m.From) {
				who = "sender"
			}
			return errorf(s.name, Unsupported, "SMTPUTF8", nil,
				"server does not offer SMTPUTF8: non-ASCII envelope %s", who)
		}
	}
	if limit, ok := c.MaxMessageSize(); ok && limit > 0 && m.size() > int64(limit) {
		return errorf(s.name, Unsupported, "size", nil,
			"message is %d bytes; the server's SIZE is %d", m.size(), limit)
	}
	return nil
}

// Idle connections are kept briefly: long enough to carry a burst, short
// enough that servers rarely drop them first (Postfix keeps them 2 s).
const (
	smtpIdleTimeout = 5 * time.Second
	smtpMinIdle     = 8
)

func (s *smtpUpstream) takeIdle() *smtpConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.idle) > 0 {
		sc := s.idle[len(s.idle)-1]
		s.idle = s.idle[:len(s.idle)-1]
		if time.Since(sc.idle) < smtpIdleTimeout {
			return sc
		}
		go sc.close()
	}
	return nil
}

func (s *smtpUpstream) putIdle(sc *smtpConn) {
	sc.idle = time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.idle) >= s.maxIdle {
		go sc.close()
		return
	}
	s.idle = append(s.idle, sc)
}

// Close quits the idle connections; called at shutdown.
func (s *smtpUpstream) Close() error {
	s.mu.Lock()
	idle := s.idle
	s.idle, s.closed = nil, true
	s.mu.Unlock()
	for _, sc := range idle {
		sc.c.Quit()
		sc.close()
	}
	return nil
}

// fail classifies err from the given phase. When ctx has ended, the I/O
// error is only the symptom of the closed connection: the cause is the
// deadline (or shutdown).
func (s *smtpUpstream) fail(ctx context.Context, ph smtpPhase, err error) *Error {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		code := strconv.Itoa(se.Code)
		if se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode != (smtp.EnhancedCode{}) {
			code += " " + fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
		}
		class := classifySMTP(ph, se.Code)
		if ph == phaseMail && class == Rejected && se.EnhancedCode[1] == 7 {
			class = SenderRejected
		}
		if c, ok := smtpNotAboutMessage(ph, se); ok {
			class = c
		}
		if smtpCannotCarry(ph, se) {
			class = Unsupported
		}
		e := errorf(s.name, class, code, err, "%s: %s", ph, s.redact(se.Message))
		if d := smtpPause(se); d > 0 {
			e.RetryAt = s.now().Add(d)
		}
		return e
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	}
	class := contextClass(err, false)
	if ph == phaseDataEnd {
		// The whole message went out; without a reply we cannot know
		// whether the upstream queued it (TLS alert, reset, timeout alike).
		class = Ambiguous
	}
	var cause string
	switch {
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		cause = "timeout"
		if ph == phaseDataEnd {
			cause = "timeout waiting for the reply to DATA (the upstream may have accepted the message)"
		}
	case errors.Is(err, context.Canceled):
		cause = "canceled"
	default:
		cause = s.redact(err.Error())
	}
	return errorf(s.name, class, "", err, "%s: %s", ph, cause)
}

// smtpMinPassword is the shortest SMTP password replaced wherever it
// occurs. It is lower than apiMinSecretLen: a password is typed by a
// person and often short, while a match of 8 characters in a server's
// reply is most likely the password being quoted.
const smtpMinPassword = 8

// redact is a server's text made fit for a reason: on one line, without
// the credentials a server may quote (go-smtp's server writes its auth
// backend's error text into the reply), decoded or as sent.
func (s *smtpUpstream) redact(text string) string {
	text = oneLine(text)
	if p := s.password.Reveal(); len(p) >= smtpMinPassword {
		text = strings.ReplaceAll(text, p, "<secret>")
	}
	return apiRedact(text, s.secrets()...)
}

// secrets is every form of the credentials sent: the password, the
// access tokens, and the AUTH responses in base64.
func (s *smtpUpstream) secrets() []Secret {
	var out []Secret
	if p := s.password.Reveal(); p != "" {
		out = append(out, s.password,
			Secret(base64.StdEncoding.EncodeToString([]byte("\x00"+s.username+"\x00"+p))),
			Secret(base64.StdEncoding.EncodeToString([]byte(p))))
	}
	if s.tokens != nil {
		host, portStr, _ := net.SplitHostPort(s.addr)
		port, _ := strconv.Atoi(portStr)
		for _, sec := range s.tokens.Secrets() {
			out = append(out, sec)
			if tok := sec.Reveal(); tok != "" {
				_, ir, _ := (&xoauth2Client{user: s.username, token: tok}).Start()
				_, bearer, _ := sasl.NewOAuthBearerClient(&sasl.OAuthBearerOptions{Username: s.username, Token: tok, Host: host, Port: port}).Start()
				out = append(out, Secret(base64.StdEncoding.EncodeToString(ir)), Secret(base64.StdEncoding.EncodeToString(bearer)))
			}
		}
	}
	return out
}

// classifySMTP maps a reply code at a phase to a class. Every 5xx at MAIL
// refuses the sender at this smarthost (SenderRejected), except 552,
// RFC 1870's SIZE refusal, which fail turns into Unsupported, or into
// SenderRejected when its enhanced code is a policy (x.7.x) one.
func classifySMTP(ph smtpPhase, code int) Class {
	switch {
	case code == 530 || code == 535 || code == 534 || code == 538:
		return ProviderFault
	case code >= 400 && code < 500:
		return Transient
	case code == 552 && ph == phaseRcpt:
		// RFC 5321 4.5.3.1.10: too many recipients was historically 552.
		return Transient
	case code >= 500:
		switch ph {
		case phaseConnect, phaseHello, phaseAuth:
			return ProviderFault
		case phaseMail:
			if code == 552 {
				return Rejected
			}
			return SenderRejected
		}
		return Rejected
	}
	return Transient
}

// smtpNotAboutMessage recognises permanent replies after MAIL that refuse
// the sender or this client rather than the message or its recipient, so
// failing over is right where a dead letter would lose mail another
// upstream would carry: Exchange Online's SendAsDenied (5.2.252) and
// 5.7.60 refuse the sender; its 5.7.57 (not authenticated), 5.7.64
// (tenant attribution) and 5.7.705/708/750 (tenant or IP blocked), and any
// x.7.x "relay access denied" (Postfix's reject_unauth_destination when
// the smarthost no longer lists us), refuse the client for every message.
func smtpNotAboutMessage(ph smtpPhase, se *smtp.SMTPError) (Class, bool) {
	if se.Code < 500 || se.Code > 599 || (ph != phaseRcpt && ph != phaseData && ph != phaseDataEnd) {
		return 0, false
	}
	switch ec := se.EnhancedCode; ec {
	case smtp.EnhancedCode{5, 2, 252}, smtp.EnhancedCode{5, 7, 60}:
		return SenderRejected, true
	case smtp.EnhancedCode{5, 7, 57}, smtp.EnhancedCode{5, 7, 64}, smtp.EnhancedCode{5, 7, 705},
		smtp.EnhancedCode{5, 7, 708}, smtp.EnhancedCode{5, 7, 750}:
		return ProviderFault, true
	}
	if se.EnhancedCode[1] == 7 {
		msg := strings.ToLower(se.Message)
		for _, p := range []string{"relay access denied", "relaying denied", "relay not permitted", "relaying not permitted"} {
			if strings.Contains(msg, p) {
				return ProviderFault, true
			}
		}
	}
	return 0, false
}

// smtpCannotCarry recognises permanent replies that are about this
// server's limits for this message rather than about the message or the
// server's health, so another upstream may carry it: the message is too big
// (552 at MAIL is RFC 1870's SIZE refusal; x.3.4 and x.2.3 are "too big"
// at any point after RCPT) or needs an extension the server lacks (x.6.3
// conversion required, x.6.7 non-ASCII address, x.6.9 UTF-8 headers).
func smtpCannotCarry(ph smtpPhase, se *smtp.SMTPError) bool {
	if se.Code < 500 || se.Code > 599 {
		return false
	}
	switch ph {
	case phaseMail, phaseRcpt, phaseData, phaseDataEnd:
	default:
		return false
	}
	ec := se.EnhancedCode
	// X.0.0 is what go-smtp (and others) fill in when a reply has none.
	noEnhanced := ec == smtp.NoEnhancedCode || ec == (smtp.EnhancedCode{}) || ec == (smtp.EnhancedCode{5, 0, 0})
	switch {
	case ec == smtp.EnhancedCode{5, 6, 3}, ec == smtp.EnhancedCode{5, 6, 7}, ec == smtp.EnhancedCode{5, 6, 9}:
		return true
	case ph == phaseRcpt:
		// 552 at RCPT is "too many recipients" (see classifySMTP).
		return false
	case ec == smtp.EnhancedCode{5, 3, 4}, ec == smtp.EnhancedCode{5, 2, 3}:
		return true
	case se.Code == 552 && (noEnhanced || ph == phaseMail && ec[1] != 7):
		return true
	}
	return false
}

// smtpRatePause is the pause after an SMTP rate reply (Gmail's 421
// 4.7.28, Microsoft's 451 4.7.500-699, "rate limit"); SMTP has no
// Retry-After, so the length is ours. Sending within the minute would be
// refused again and may count against the sender's reputation. Postfix
// stays away from a destination that blamed itself for
// minimal_backoff_time (300 s); relaycar can fail over, so it asks sooner.
const smtpRatePause = time.Minute

// smtpPause is how long a temporary reply asks relaycar to stay away from
// this upstream, 0 for none. Only replies about rate or quota pause. Any
// other 421 (shutting down, overloaded) is a sick server: like Postfix's
// dead-destination list, that is the breaker's to count and open. A 4xx
// about one mailbox (4.2.x, such as Gmail's 450 4.2.1 receiving-rate
// reply), greylisting and other temporary failures are left to the retry
// schedule and the breaker too.
func smtpPause(se *smtp.SMTPError) time.Duration {
	if se.Code < 400 || se.Code > 499 {
		return 0
	}
	ec := se.EnhancedCode
	m := strings.ToLower(se.Message)
	mailbox := ec[0] == 4 && ec[1] == 2
	greylist := strings.Contains(m, "greylist") || strings.Contains(m, "graylist")
	rate := ec == smtp.EnhancedCode{4, 7, 28} || ec[0] == 4 && ec[1] == 7 && ec[2] >= 500 && ec[2] <= 699
	for _, w := range smtpRateWords {
		if strings.Contains(m, w) {
			rate = true
		}
	}
	quota := strings.Contains(m, "daily") && (strings.Contains(m, "quota") || strings.Contains(m, "limit"))
	switch {
	case quota && !mailbox:
		// A daily sending quota ("454 Throttling failure: Daily message
		// quota exceeded"): nothing gets through before it frees up.
		return throttleMax
	case strings.Contains(m, "maximum sending rate"):
		// SES's SMTP interface: a per-second limit, as through its API.
		return throttleDefault
	case rate && !mailbox && !greylist:
		return smtpRatePause
	case se.Code == 421 && ec[0] == 4 && ec[1] == 7:
		// A policy reason for closing ("421 4.7.0 Try again later").
		return smtpRatePause
	}
	return 0
}

// smtpRateWords are phrases of rate-limit replies. "too many recipients"
// (452 4.5.3, a per-transaction limit) is deliberately not among them.
var smtpRateWords = []string{"rate limit", "ratelimit", "rate-limit", "rate exceeded", "sending rate",
	"unusual rate", "throttl", "too many messages", "too many requests", "messages per", "server busy", "slow down"}

var (
	_ Upstream = (*smtpUpstream)(nil)
	_ Closer   = (*smtpUpstream)(nil)
)
