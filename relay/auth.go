package relay

import (
	"crypto/tls"
	"errors"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
)

// loginServer is SASL LOGIN (draft-murchison-sasl-login), which go-sasl
// only has as a client. Many legacy apps (and Outlook) speak only LOGIN.
type loginServer struct {
	step  int
	user  string
	check func(user, pass string) error
}

func (l *loginServer) Next(resp []byte) ([]byte, bool, error) {
	switch l.step {
	case 0:
		if len(resp) > 0 { // initial response carries the user name
			l.user, l.step = string(resp), 2
			return []byte("Password:"), false, nil
		}
		l.step = 1
		return []byte("Username:"), false, nil
	case 1:
		l.user, l.step = string(resp), 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.check(l.user, string(resp))
	}
	return nil, true, errors.New("unexpected client response")
}

// checkUser compares against the htpasswd bcrypt hash. Unknown users are
// compared against a dummy hash so timing does not reveal which users exist.
func checkUser(users map[string][]byte, user, pass string) error {
	h, ok := users[user]
	if !ok {
		h = dummyHash
	}
	if bcrypt.CompareHashAndPassword(h, []byte(pass)) != nil || !ok {
		return smtp.ErrAuthFailed
	}
	return nil
}

// dummyHash is bcrypt("relaycar") at cost 10.
var dummyHash = []byte("$2a$10$EwZDN1F6PVUgYUfY8rGdlOz7CYoNb53p4HK//WeVq5IwUTMjev8FC")

func (s *session) AuthMechanisms() []string {
	if s.in.users() == nil || !s.authAllowed() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// authAllowed: credentials only cross TLS or loopback.
func (s *session) authAllowed() bool {
	_, isTLS := s.conn.TLSConnectionState()
	return isTLS || isLoopback(s.conn.Conn().RemoteAddr())
}

func (s *session) Auth(mech string) (sasl.Server, error) {
	if s.in.users() == nil {
		return nil, smtp.ErrAuthUnsupported
	}
	if !s.authAllowed() {
		return nil, replyEncryptionRequired
	}
	check := func(user, pass string) error {
		if err := checkUser(s.in.users(), user, pass); err != nil {
			return s.authFailed(user)
		}
		s.user = user
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, user, pass string) error {
			if identity != "" && identity != user {
				return s.authFailed(user)
			}
			return check(user, pass)
		}), nil
	case sasl.Login:
		return &loginServer{check: check}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// Defaults of the AUTH brake: each failure is answered after
// authFailDelay, and the connection is closed at the authMaxFailures-th.
// go-smtp itself neither delays nor counts AUTH failures (they are not
// protocol errors for its errThreshold), so without this one connection
// could try passwords as fast as bcrypt compares them.
const (
	defaultAuthFailDelay   = time.Second
	defaultAuthMaxFailures = 3
)

func (in *intake) authBrake() (delay time.Duration, limit int) {
	delay, limit = in.authFailDelay, in.authMaxFailures
	if delay == 0 {
		delay = defaultAuthFailDelay
	}
	if limit == 0 {
		limit = defaultAuthMaxFailures
	}
	return delay, limit
}

// authFailed counts one failure against the connection, waits out the
// delay (cut short if the connection closes) and answers 535, or 421 and
// closes the connection at the limit. The count lives on the connection,
// not the session: a new EHLO keeps the session, STARTTLS replaces it.
func (s *session) authFailed(user string) error {
	s.in.authFailures.Inc()
	n := s.addAuthFailure()
	delay, limit := s.in.authBrake()
	s.log.Warn("authentication failed", "user", user, "failures", n)
	t := time.NewTimer(delay)
	defer t.Stop()
	var closed <-chan struct{}
	if s.cc != nil {
		closed = s.cc.done
	}
	select {
	case <-t.C:
	case <-closed:
	}
	if n >= limit {
		s.log.Warn("closing connection: too many authentication failures", "failures", n)
		return s.hangUp(replyAuthTooMany)
	}
	return smtp.ErrAuthFailed
}

func (s *session) addAuthFailure() int {
	if s.cc != nil {
		return int(s.cc.authFailures.Add(1))
	}
	s.authFails++
	return s.authFails
}

func loadTLS(c TLSConfig) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}
