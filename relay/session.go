package relay

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/mail"
	"strings"

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
	inTx  bool
}

// endTx marks the end of a MAIL..DATA transaction; draining waits only for
// those, not for idle connections.
func (s *session) endTx() {
	if s.inTx {
		s.inTx = false
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
	if s.r.users != nil && s.user == "" {
		return s.refuse(replyAuthRequired)
	}
	if from != "" {
		if _, err := mail.ParseAddress("<" + from + ">"); err != nil && upstreams.IsASCII(from) {
			return s.refuse(replyBadSender)
		}
	}
	if len(s.r.allowedSenders) > 0 && !s.r.allowedSenders[upstreams.Domain(from)] {
		s.log.Warn("sender refused: domain not allowed", "from", from)
		return s.refuse(replySenderDenied)
	}
	s.from = from
	if !s.inTx {
		s.inTx = true
		s.r.inTx.Add(1)
	}
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.IndexByte(to, '@') <= 0 || strings.HasSuffix(to, "@") {
		return s.refuse(replyBadAddress)
	}
	if _, err := mail.ParseAddress("<" + to + ">"); err != nil && upstreams.IsASCII(to) {
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
