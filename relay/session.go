package relay

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/mail"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/upstreams"
)

// backend creates one session per SMTP connection (at EHLO).
type backend struct{ r *Relay }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	if b.r.draining.Load() {
		return nil, replyShuttingDown
	}
	return &session{r: b.r, conn: c, log: b.r.log.With("remote_addr", c.Conn().RemoteAddr().String())}, nil
}

// session is one SMTP transaction at a time. Every error it returns is an
// *smtp.SMTPError: go-smtp turns any other error from Data into a permanent
// 554 that quotes the error text to the client.
type session struct {
	r     *Relay
	conn  *smtp.Conn
	log   *slog.Logger
	user  string
	from  string
	rcpts []string
	// inTx is atomic: go-smtp calls Logout from the goroutine that closes
	// the server while the session's own goroutine may be in Mail.
	inTx atomic.Bool
}

// endTx marks the end of a MAIL..DATA transaction; draining waits only for
// those, not for idle connections.
func (s *session) endTx() {
	if s.inTx.CompareAndSwap(true, false) {
		s.r.inTx.Add(-1)
	}
}

func (s *session) Reset() {
	s.from, s.rcpts = "", nil
	s.endTx()
}

func (s *session) Logout() error {
	s.endTx()
	return nil
}

func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	if s.r.draining.Load() {
		// A pooled connection starting a new transaction while we drain:
		// send it elsewhere (or later) instead of holding the shutdown.
		return s.refuse(replyShuttingDown)
	}
	if s.r.users != nil && s.user == "" {
		return s.refuse(replyAuthRequired)
	}
	if from != "" && !validAddress(from) {
		return s.refuse(replyBadSender)
	}
	if len(s.r.allowedSenders) > 0 && !s.r.allowedSenders[upstreams.Domain(from)] {
		s.log.Warn("sender refused: domain not allowed", "from", from)
		return s.refuse(replySenderDenied)
	}
	s.from = from
	if s.inTx.CompareAndSwap(false, true) {
		s.r.inTx.Add(1)
	}
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.IndexByte(to, '@') <= 0 || strings.HasSuffix(to, "@") || !validAddress(to) {
		return s.refuse(replyBadAddress)
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

func (s *session) Data(r io.Reader) error {
	raw, err := io.ReadAll(r)
	if err != nil {
		if errors.Is(err, smtp.ErrDataTooLarge) {
			return s.refuse(replyTooBig)
		}
		s.log.Warn("reading message failed", "err", err)
		return s.refuse(replyReadFailed)
	}
	if hasBareCRLF(raw) {
		if s.r.cfg.Listen.BareLF == "reject" {
			s.log.Warn("message refused: bare CR or LF", "from", s.from)
			return s.refuse(replyBareLF)
		}
		raw = normalizeCRLF(raw)
	}
	id, err := s.r.accept(s.from, s.rcpts, raw, s.traceInfo())
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return s.refuse(se)
		}
		s.log.Error("spooling message failed", "err", err)
		return s.refuse(replySpoolFailed)
	}
	return replyQueued(id)
}

// validAddress checks an envelope address. ASCII addresses must parse as
// RFC 5322; SMTPUTF8 ones must be valid UTF-8. Neither may carry control
// characters: a CR in an address copied into a header (SMTP2GO's Bcc) would
// be header injection.
func validAddress(a string) bool {
	if !utf8.ValidString(a) {
		return false
	}
	for _, c := range a {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	if upstreams.IsASCII(a) {
		_, err := mail.ParseAddress("<" + a + ">")
		return err == nil
	}
	return true
}

func (s *session) traceInfo() receivedInfo {
	with := "ESMTP"
	if _, ok := s.conn.TLSConnectionState(); ok {
		with += "S"
	}
	if s.user != "" {
		with += "A"
	}
	remote := s.conn.Conn().RemoteAddr().String()
	if host, _, err := net.SplitHostPort(remote); err == nil {
		remote = host
	}
	return receivedInfo{helo: s.conn.Hostname(), remote: remote, hostname: s.r.cfg.Listen.Hostname, with: with}
}

func (s *session) refuse(e *smtp.SMTPError) error {
	s.r.metrics.smtpRefused.WithLabelValues(itoa(e.Code)).Inc()
	return e
}

var (
	_ smtp.Session     = (*session)(nil)
	_ smtp.AuthSession = (*session)(nil)
)
