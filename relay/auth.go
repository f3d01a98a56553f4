package relay

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
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

// authUsers is a users file as loaded.
type authUsers struct {
	hashes map[string][]byte // nil: AUTH is off
	// dummy is compared for unknown users. It has the cost most of the
	// file's hashes have (htpasswd -B makes cost 5, Go and Python 10 and
	// 12), so the time of a refusal does not tell which users exist.
	dummy []byte
	cost  int // of dummy: the most common in the file
}

// maxBcryptCost is the highest cost a users file may use (htpasswd's
// own limit): a login at cost 17 already takes seconds of CPU.
const maxBcryptCost = 17

// loadUsers reads an htpasswd file with bcrypt hashes. The dummy is left
// to the caller (newDummy): making one costs a bcrypt hash.
func loadUsers(path string) (*authUsers, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	u := &authUsers{hashes: map[string][]byte{}}
	costs := map[int]int{}
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		user, hash, ok := strings.Cut(t, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("line %d: want user:bcrypt-hash", line)
		}
		if !strings.HasPrefix(hash, "$2a$") && !strings.HasPrefix(hash, "$2b$") && !strings.HasPrefix(hash, "$2y$") {
			return nil, fmt.Errorf("line %d: user %q: only bcrypt hashes are supported (htpasswd -B)", line, user)
		}
		cost, err := bcrypt.Cost([]byte(hash))
		if err != nil || len(hash) != 60 {
			return nil, fmt.Errorf("line %d: user %q: not a whole bcrypt hash", line, user)
		}
		if cost > maxBcryptCost {
			return nil, fmt.Errorf("line %d: user %q: bcrypt cost %d is above %d (each login would take minutes of CPU)", line, user, cost, maxBcryptCost)
		}
		u.hashes[user] = []byte(hash)
		costs[cost]++
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	u.cost = bcrypt.DefaultCost
	for c, n := range costs {
		if n > costs[u.cost] || n == costs[u.cost] && c > u.cost {
			u.cost = c
		}
	}
	return u, nil
}

// newDummy sets u.dummy, reusing old's when it has the same cost.
func (u *authUsers) newDummy(old *authUsers) error {
	if old != nil && old.dummy != nil && old.cost == u.cost {
		u.dummy = old.dummy
		return nil
	}
	pass := make([]byte, 16)
	rand.Read(pass)
	h, err := bcrypt.GenerateFromPassword(pass, u.cost)
	u.dummy = h
	return err
}

// checkUser verifies a password against the users file. A login seen
// recently skips bcrypt (authCache); every other check waits for one of
// the bcrypt slots, so a storm of logins takes at most half the CPU from
// the mail (closed: the connection went away while it waited).
func (in *intake) checkUser(closed <-chan struct{}, user, pass string) error {
	u := in.users()
	h, ok := u.hashes[user]
	if ok && in.authCache.hit(user, h, pass, time.Now()) {
		return nil
	}
	if !ok {
		h = u.dummy
	}
	select {
	case in.bcryptSlots <- struct{}{}:
	case <-closed:
		return smtp.ErrAuthFailed
	}
	err := in.compare(h, []byte(pass))
	<-in.bcryptSlots
	if err != nil || !ok {
		return smtp.ErrAuthFailed
	}
	in.authCache.put(user, h, pass, time.Now())
	return nil
}

// bcryptSlots is how many bcrypt compares run at once: half the CPUs.
func bcryptSlots() int { return max(1, runtime.GOMAXPROCS(0)/2) }

// authCache remembers recent logins. An app that logs in on every
// connection (one connection per message, as PHPMailer and most legacy
// senders do) otherwise pays a bcrypt compare per message: 61 ms of CPU at
// cost 10 on the benchmark machine, which held such a sender to 16
// messages/s. As in Dovecot's auth_cache, an entry holds no password: it
// holds an HMAC of it under a key drawn at start, and the hash it was
// verified against, so a changed or removed user misses at once. Entries
// are not renewed by a hit: each user is verified by bcrypt at least once
// per ttl.
type authCache struct {
	key [32]byte
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]authEntry
}

type authEntry struct {
	hash []byte
	mac  [sha256.Size]byte
	at   time.Time
}

const (
	defaultAuthCacheTTL = 15 * time.Minute
	authCacheMax        = 4096 // entries; only users of the file get one
)

func newAuthCache(ttl time.Duration) *authCache {
	c := &authCache{ttl: ttl, m: map[string]authEntry{}}
	rand.Read(c.key[:])
	return c
}

func (c *authCache) sum(user, pass string) (out [sha256.Size]byte) {
	m := hmac.New(sha256.New, c.key[:])
	m.Write([]byte(user))
	m.Write([]byte{0})
	m.Write([]byte(pass))
	m.Sum(out[:0])
	return out
}

func (c *authCache) hit(user string, hash []byte, pass string, now time.Time) bool {
	c.mu.Lock()
	e, ok := c.m[user]
	c.mu.Unlock()
	if !ok || now.Sub(e.at) >= c.ttl || !bytes.Equal(e.hash, hash) {
		return false
	}
	sum := c.sum(user, pass)
	return hmac.Equal(sum[:], e.mac[:])
}

func (c *authCache) put(user string, hash []byte, pass string, now time.Time) {
	sum := c.sum(user, pass)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[user]; !ok && len(c.m) >= authCacheMax {
		for k, e := range c.m {
			if now.Sub(e.at) >= c.ttl {
				delete(c.m, k)
			}
		}
		for k := range c.m {
			if len(c.m) < authCacheMax {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[user] = authEntry{hash: hash, mac: sum, at: now}
}

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
		var closed <-chan struct{}
		if s.cc != nil {
			closed = s.cc.done
		}
		if err := s.in.checkUser(closed, user, pass); err != nil {
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
