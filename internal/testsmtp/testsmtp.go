// Package testsmtp is an in-process SMTP server for tests: it records what
// it receives and answers each phase with scripted replies, so a test can
// say "421 twice, then accept" or "hang after DATA".
package testsmtp

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Msg is one message the server accepted.
type Msg struct {
	From string
	To   []string
	Data []byte
	User string
	TLS  bool
}

// Script decides the reply at each phase; nil functions accept. They run
// under the server's lock, so they may count calls without their own.
type Script struct {
	Mail func(from string) error
	Rcpt func(to string) error
	// Data runs after the whole message was read.
	Data func(m Msg) error
	// DataDelay is slept before Data answers (slow or hanging upstream).
	DataDelay time.Duration
}

// Options configure a server.
type Options struct {
	// TLS enables STARTTLS, or implicit TLS when Implicit is set.
	TLS      *tls.Config
	Implicit bool
	// Users enables AUTH PLAIN (and requires it before MAIL).
	Users map[string]string
	// Bearer enables AUTH XOAUTH2 and OAUTHBEARER (and requires AUTH
	// before MAIL): a token is good for user when Bearer returns true.
	Bearer func(user, token string) bool
	// PlainReply, when set, is the reply to every AUTH PLAIN (a server
	// that no longer takes passwords: 535 5.7.139).
	PlainReply *smtp.SMTPError
	// Addr pins the address (default 127.0.0.1:0).
	Addr string
	// MaxMessageBytes advertises SIZE.
	MaxMessageBytes int64
}

// Server is a running fake.
type Server struct {
	Addr string
	opts Options
	t    testing.TB

	mu     sync.Mutex
	script Script
	msgs   []Msg
	conns  int
	// authLines are the lengths of the XOAUTH2 responses read.
	authLines []AuthResponse
	srv       *smtp.Server
	ln        net.Listener
	stopped   bool
}

// Start runs a server on 127.0.0.1 until the test ends.
func Start(t testing.TB, o Options) *Server {
	t.Helper()
	s := &Server{opts: o, t: t}
	if o.Addr == "" {
		o.Addr = "127.0.0.1:0"
	}
	if err := s.listen(o.Addr); err != nil {
		t.Fatalf("testsmtp: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) listen(addr string) error {
	var (
		ln  net.Listener
		err error
	)
	// The port may linger briefly after Stop; retry a little on restart.
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	srv := smtp.NewServer(&backend{s})
	srv.Domain = "sink.test"
	srv.MaxMessageBytes = s.opts.MaxMessageBytes
	srv.ReadTimeout, srv.WriteTimeout = 30*time.Second, 30*time.Second
	srv.MaxLineLength = 1 << 20
	srv.AllowInsecureAuth = true
	srv.ErrorLog = nopLogger{}
	if s.opts.TLS != nil {
		srv.TLSConfig = s.opts.TLS
		if s.opts.Implicit {
			ln = tls.NewListener(ln, s.opts.TLS)
		}
	}
	s.mu.Lock()
	s.srv, s.ln, s.Addr, s.stopped = srv, ln, ln.Addr().String(), false
	s.mu.Unlock()
	go srv.Serve(ln)
	return nil
}

// Stop closes the listener and every connection: the upstream is "down".
func (s *Server) Stop() {
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.stopped = true
	s.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
	// srv.Close only closes listeners that Serve has registered; right
	// after Start or Restart, Serve may not have run yet.
	if ln != nil {
		ln.Close()
	}
}

// Restart listens again on the same address: the upstream "came back".
func (s *Server) Restart() {
	s.t.Helper()
	if err := s.listen(s.Addr); err != nil {
		s.t.Fatalf("testsmtp restart: %v", err)
	}
}

// SetUsers replaces the AUTH PLAIN users (a rotated password).
func (s *Server) SetUsers(users map[string]string) {
	s.mu.Lock()
	s.opts.Users = users
	s.mu.Unlock()
}

// SetScript replaces the replies.
func (s *Server) SetScript(sc Script) {
	s.mu.Lock()
	s.script = sc
	s.mu.Unlock()
}

// Messages returns a copy of what was accepted so far.
func (s *Server) Messages() []Msg {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Msg(nil), s.msgs...)
}

// Count is len(Messages()).
func (s *Server) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.msgs)
}

// Conns is the number of sessions started.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// Reply builds an SMTP error reply, e.g. Reply(421, "4.3.2", "try later").
func Reply(code int, enh string, msg string) *smtp.SMTPError {
	e := smtp.NoEnhancedCode
	if parts := strings.Split(enh, "."); len(parts) == 3 {
		for i, p := range parts {
			n, err := strconv.Atoi(p)
			if err != nil {
				return &smtp.SMTPError{Code: code, EnhancedCode: smtp.NoEnhancedCode, Message: msg}
			}
			e[i] = n
		}
	}
	return &smtp.SMTPError{Code: code, EnhancedCode: e, Message: msg}
}

type backend struct{ s *Server }

func (b *backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	b.s.mu.Lock()
	b.s.conns++
	b.s.mu.Unlock()
	_, isTLS := c.TLSConnectionState()
	return &session{s: b.s, tls: isTLS}, nil
}

type session struct {
	s    *Server
	tls  bool
	user string
	msg  Msg
}

func (ss *session) AuthMechanisms() []string {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	var mechs []string
	if ss.s.opts.Users != nil || ss.s.opts.PlainReply != nil {
		mechs = append(mechs, sasl.Plain)
	}
	if ss.s.opts.Bearer != nil {
		mechs = append(mechs, "XOAUTH2", sasl.OAuthBearer)
	}
	return mechs
}

func (ss *session) Auth(mech string) (sasl.Server, error) {
	switch mech {
	case "XOAUTH2":
		return &xoauth2Server{ss: ss}, nil
	case sasl.OAuthBearer:
		return sasl.NewOAuthBearerServer(func(o sasl.OAuthBearerOptions) *sasl.OAuthBearerError {
			if ss.s.opts.Bearer(o.Username, o.Token) {
				ss.user = o.Username
				return nil
			}
			return &sasl.OAuthBearerError{Status: "invalid_token", Schemes: "bearer"}
		}), nil
	}
	if r := ss.s.opts.PlainReply; r != nil {
		return sasl.NewPlainServer(func(_, _, _ string) error { return r }), nil
	}
	return sasl.NewPlainServer(func(_, user, pass string) error {
		ss.s.mu.Lock()
		p, ok := ss.s.opts.Users[user]
		ss.s.mu.Unlock()
		if ok && p == pass {
			ss.user = user
			return nil
		}
		return smtp.ErrAuthFailed
	}), nil
}

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	if (ss.s.opts.Users != nil || ss.s.opts.Bearer != nil) && ss.user == "" {
		return smtp.ErrAuthRequired
	}
	if f := ss.s.script.Mail; f != nil {
		if err := f(from); err != nil {
			return err
		}
	}
	ss.msg = Msg{From: from, User: ss.user, TLS: ss.tls}
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	if f := ss.s.script.Rcpt; f != nil {
		if err := f(to); err != nil {
			return err
		}
	}
	ss.msg.To = append(ss.msg.To, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.msg.Data = b
	ss.s.mu.Lock()
	delay := ss.s.script.DataDelay
	ss.s.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	if ss.s.stopped {
		return errors.New("stopped")
	}
	if f := ss.s.script.Data; f != nil {
		if err := f(ss.msg); err != nil {
			return err
		}
	}
	ss.s.msgs = append(ss.s.msgs, ss.msg)
	return nil
}

func (ss *session) Reset()        { ss.msg = Msg{} }
func (ss *session) Logout() error { return nil }

// xoauth2Server is the server side of XOAUTH2 as Google documents it: a
// bad token gets a 334 challenge with a JSON status, the client answers
// with an empty line, and the exchange ends in 535 5.7.8.
type xoauth2Server struct {
	ss     *session
	asked  bool // the server prompted for the response
	failed bool
}

func (x *xoauth2Server) Next(resp []byte) ([]byte, bool, error) {
	if x.failed {
		return nil, true, &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Username and Password not accepted"}
	}
	if resp == nil {
		x.asked = true
		return []byte{}, false, nil // ask for the initial response
	}
	x.ss.s.mu.Lock()
	x.ss.s.authLines = append(x.ss.s.authLines, AuthResponse{Len: len(resp), OnAuthLine: !x.asked})
	x.ss.s.mu.Unlock()
	parts := strings.Split(string(resp), "\x01")
	var user, tok string
	for _, p := range parts {
		if v, ok := strings.CutPrefix(p, "user="); ok {
			user = v
		}
		if v, ok := strings.CutPrefix(p, "auth=Bearer "); ok {
			tok = v
		}
	}
	if len(parts) != 4 || parts[2] != "" || parts[3] != "" || user == "" || tok == "" || !x.ss.s.opts.Bearer(user, tok) {
		x.failed = true
		return []byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`), false, nil
	}
	x.ss.user = user
	return nil, true, nil
}

// AuthResponse is one XOAUTH2 initial response the server read.
type AuthResponse struct {
	Len int
	// OnAuthLine: sent on the AUTH command line itself rather than after
	// the server's 334 prompt (too long a line for Gmail with a real token).
	OnAuthLine bool
}

// AuthResponses lists the XOAUTH2 initial responses read so far.
func (s *Server) AuthResponses() []AuthResponse {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]AuthResponse(nil), s.authLines...)
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}
func (nopLogger) Println(...any)        {}
