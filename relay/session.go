package relay

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/mail"
	"os"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// NewSession makes the intake go-smtp's backend: one session per SMTP
// connection (at EHLO).
func (in *intake) NewSession(c *smtp.Conn) (smtp.Session, error) {
	if in.tx.isDraining() {
		return nil, replyShuttingDown
	}
	return &session{in: in, conn: c, cc: clientConnOf(c.Conn()), log: in.log.With("remote_addr", c.Conn().RemoteAddr().String())}, nil
}

// session is one SMTP transaction at a time. Every error it returns is an
// *smtp.SMTPError: go-smtp turns any other error from Data into a permanent
// 554 that quotes the error text to the client.
type session struct {
	in    *intake
	conn  *smtp.Conn
	cc    *clientConn // nil only for a connection that bypassed allowListener
	log   *slog.Logger
	user  string
	from  string
	rcpts []string
	// utf8: this transaction's MAIL had SMTPUTF8 (RFC 6531).
	utf8 bool
	// authFails counts AUTH failures when there is no clientConn.
	authFails int
	// inTx is atomic: go-smtp calls Logout from the goroutine that closes
	// the server while the session's own goroutine may be in Mail.
	inTx atomic.Bool
}

// endTx marks the end of a MAIL..DATA transaction; draining waits only for
// those, not for idle connections.
func (s *session) endTx() {
	if s.inTx.CompareAndSwap(true, false) {
		s.in.tx.add(-1)
	}
}

func (s *session) Reset() {
	s.from, s.rcpts, s.utf8 = "", nil, false
	s.endData()
	s.endTx()
}

func (s *session) Logout() error {
	s.endData()
	s.endTx()
	return nil
}

func (s *session) endData() {
	if s.cc != nil {
		s.cc.endData()
	}
}

// timedOut: a read on this connection timed out, and go-smtp is still
// handling the partial line bufio passed on without the error. The
// connection ends at go-smtp's next read; refuse the line meanwhile.
func (s *session) timedOut() bool { return s.cc != nil && s.cc.timedOut() }

func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.timedOut() {
		return s.refuse(replyTimedOut)
	}
	if s.in.tx.isDraining() {
		// A pooled connection starting a new transaction while we drain:
		// send it elsewhere (or later) instead of holding the shutdown.
		return s.refuse(replyShuttingDown)
	}
	if s.in.users() != nil && s.user == "" {
		return s.refuse(replyAuthRequired)
	}
	if s.in.room != nil {
		if err := s.in.room(); err != nil {
			// Postfix's queue_minfree answer: the client keeps the mail.
			s.log.Warn("message refused: spool full", "err", err)
			return s.refuse(replySpoolFull)
		}
	}
	if from != "" && !validAddress(from) {
		return s.refuse(replyBadSender)
	}
	smtputf8 := opts != nil && opts.UTF8
	if !smtputf8 && !upstreams.IsASCII(from) {
		return s.refuse(replyNeedSMTPUTF8)
	}
	if !withinLimits(from) {
		return s.refuse(replySenderTooLong)
	}
	if len(s.in.allowedSenders()) > 0 && !s.in.allowedSenders()[upstreams.Domain(from)] {
		s.log.Warn("sender refused: domain not allowed", "from", from)
		return s.refuse(replySenderDenied)
	}
	s.from, s.utf8 = from, smtputf8
	if s.inTx.CompareAndSwap(false, true) {
		s.in.tx.add(1)
	}
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if s.timedOut() {
		return s.refuse(replyTimedOut)
	}
	if strings.IndexByte(to, '@') <= 0 || strings.HasSuffix(to, "@") || !validAddress(to) {
		return s.refuse(replyBadAddress)
	}
	if !s.utf8 && !upstreams.IsASCII(to) {
		return s.refuse(replyNeedSMTPUTF8)
	}
	if !withinLimits(to) {
		return s.refuse(replyRcptTooLong)
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

func (s *session) Data(r io.Reader) error {
	if s.cc != nil {
		// Until Reset: read_timeout per read, data_timeout for the whole.
		s.cc.startData(s.in.readTimeout, s.in.dataTimeout)
	}
	// What this DATA may hold in memory, whatever the message's size; the
	// budget says no before the process would run out (451 4.3.1).
	release, ok := s.in.budget.TryAcquire(intakeReserve)
	if !ok {
		s.log.Warn("message refused: memory budget exhausted", "from", s.from, "budget", s.in.budget.Limit())
		return s.refuse(replyNoMemory)
	}
	defer release()
	ready := func() error {
		if s.timedOut() {
			// "BDAT 0 LAST" without its CRLF: go-smtp ran the partial line.
			return os.ErrDeadlineExceeded
		}
		if s.cc != nil && s.cc.peerEOF.Load() {
			// The client hung up: a BDAT chunk may have been cut short,
			// and nobody is left to hear a 250.
			return fmt.Errorf("%w: client closed the connection during the message", errReading)
		}
		if s.sawDotCR() {
			// go-smtp already dropped the ".\r", so there is nothing left
			// to normalise: refused in both bare_lf modes.
			return fmt.Errorf("<CR><LF>.<CR> in DATA: %w", errBareLF)
		}
		return nil
	}
	body := newCRLFReader(r, s.in.bareLF == BareLFNormalize)
	id, err := s.in.accept(s.from, s.rcpts, body, s.traceInfo(), ready)
	if err == nil {
		return replyQueued(id)
	}
	var se *smtp.SMTPError
	switch {
	case errors.As(err, &se):
		return s.refuse(se)
	case errors.Is(err, smtp.ErrDataTooLarge), errors.Is(err, errTooBigForRoute):
		return s.refuse(replyTooBig)
	case errors.Is(err, errHeaderTooLong):
		return s.refuse(replyHeaderTooBig)
	case errors.Is(err, errNoRoute):
		return s.refuse(replyNoRoute)
	case errors.Is(err, errBareLF):
		s.log.Warn("message refused: bare CR or LF", "from", s.from)
		return s.refuse(replyBareLF)
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.log.Warn("reading message timed out", "from", s.from)
		return s.refuse(replyDataTimeout)
	case errors.Is(err, errReading):
		s.log.Warn("reading message failed", "err", err)
		return s.refuse(replyReadFailed)
	case errors.Is(err, spool.ErrFull):
		s.log.Warn("message refused: spool full", "err", err)
		return s.refuse(replySpoolFull)
	}
	s.log.Error("spooling message failed", "err", err)
	return s.refuse(replySpoolFailed)
}

// sawDotCR reports the <CR><LF>.<CR> sequence that go-smtp's DATA reader
// hides (see dotCRScan). The scan sees plaintext only without TLS; under
// STARTTLS it reads ciphertext and is not consulted, and go-smtp still
// drops such a ".<CR>" unnoticed: closing that needs its data reader fixed.
func (s *session) sawDotCR() bool {
	if s.cc == nil {
		return false
	}
	if _, isTLS := s.conn.TLSConnectionState(); isTLS {
		return false
	}
	return s.cc.dotCR.Load()
}

// withinLimits applies RFC 5321 4.5.3.1: a local part of at most 64
// octets, a domain of at most 255 (labels of at most 63), and a path of
// at most 256 octets with its angle brackets, so 254 for the address.
func withinLimits(a string) bool {
	if len(a) > 254 {
		return false
	}
	at := strings.LastIndexByte(a, '@')
	if at < 0 {
		return true // the null sender; RCPT checks the @ itself
	}
	if at > 64 {
		return false
	}
	for _, label := range strings.Split(a[at+1:], ".") {
		if len(label) > 63 {
			return false
		}
	}
	return true
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
	// Without a clientConn the listener's trust decision is unknown:
	// trusted only when no trusted_networks are configured.
	trusted := len(s.in.trusted) == 0
	if s.cc != nil {
		trusted = s.cc.trusted
	}
	return receivedInfo{helo: s.conn.Hostname(), remote: remote, hostname: s.in.hostname, with: with, trusted: trusted}
}

func (s *session) refuse(e *smtp.SMTPError) error {
	s.in.refused.WithLabelValues(itoa(e.Code)).Inc()
	return e
}

// hangUp sends e and closes the connection. go-smtp only writes what a
// session returns and reads on, so the reply goes out here first, through
// the connection go-smtp uses (the *tls.Conn after STARTTLS); go-smtp's own
// write of e then fails on the closed connection and its read loop ends.
func (s *session) hangUp(e *smtp.SMTPError) error {
	nc := s.conn.Conn()
	// The reply is best effort: the connection closes either way. A
	// deadline that cannot be set means the connection is already gone
	// (and the write could otherwise block on a peer that never reads).
	if d := s.in.writeTimeout; d <= 0 || nc.SetWriteDeadline(time.Now().Add(d)) == nil {
		_, _ = fmt.Fprintf(nc, "%d %d.%d.%d %s\r\n", e.Code, e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2], e.Message)
	}
	_ = s.conn.Close() // hanging up; a close error changes nothing
	return s.refuse(e)
}

var (
	_ smtp.Session     = (*session)(nil)
	_ smtp.AuthSession = (*session)(nil)
)
