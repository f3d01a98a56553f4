package relay

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
)

// countCompares wraps the relay's bcrypt compare and counts its calls.
func countCompares(r *Relay) *atomic.Int64 {
	n := new(atomic.Int64)
	real := r.intake.compare
	r.intake.compare = func(h, p []byte) error { n.Add(1); return real(h, p) }
	return n
}

func writeUsers(t *testing.T, path string, pairs ...string) {
	t.Helper()
	var b strings.Builder
	for i := 0; i < len(pairs); i += 2 {
		h, err := bcrypt.GenerateFromPassword([]byte(pairs[i+1]), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(pairs[i] + ":" + string(h) + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// login opens a connection, authenticates and sends one message, the way
// a legacy app does for each message.
func login(t *testing.T, addr, user, pass string) error {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", user, pass)); err != nil {
		return err
	}
	return c.SendMail("app@example.com", []string{"b@example.net"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
}

// An app that logs in on every connection pays bcrypt once, not for every
// message; a wrong password, and a password the users file no longer
// has, are still checked by bcrypt and refused.
func TestAuth_RepeatedLoginIsVerifiedOnce(t *testing.T) {
	t.Parallel()
	users := filepath.Join(t.TempDir(), "users")
	writeUsers(t, users, "app", "s3cret", "other", "pw2")
	a := &recorder{name: "a"}
	var compares *atomic.Int64
	tr := startTuned(t, []*recorder{a}, nil, func(c *Config) { c.Listen.Auth.UsersFile = users },
		func(r *Relay) { r.intake.authFailDelay = time.Millisecond; compares = countCompares(r) })

	for i := range 5 {
		if err := login(t, tr.smtp, "app", "s3cret"); err != nil {
			t.Fatalf("login %d: %v", i+1, err)
		}
	}
	if n := compares.Load(); n != 1 {
		t.Errorf("five logins of one user made %d bcrypt compares, want 1", n)
	}
	if err := login(t, tr.smtp, "app", "s3cret-not"); smtpCode(err) != 535 {
		t.Errorf("wrong password after a cached login: %v, want 535", err)
	}
	if err := login(t, tr.smtp, "other", "s3cret"); smtpCode(err) != 535 {
		t.Errorf("app's password for another user: %v, want 535", err)
	}
	if n := compares.Load(); n != 3 {
		t.Errorf("two refused logins: %d compares in all, want 3", n)
	}

	// The password is changed in the users file: the old one is refused
	// at once, without waiting for the cache entry to expire.
	writeUsers(t, users, "app", "n3w", "other", "pw2")
	cfg := *tr.engine.Load().cfg
	if err := tr.Reload(&cfg); err != nil {
		t.Fatal(err)
	}
	if err := login(t, tr.smtp, "app", "s3cret"); smtpCode(err) != 535 {
		t.Errorf("old password after the users file changed: %v, want 535", err)
	}
	if err := login(t, tr.smtp, "app", "n3w"); err != nil {
		t.Errorf("new password: %v", err)
	}
	waitFor(t, "the messages", func() bool { return len(a.accepted()) == 6 })
}

func TestAuthCache_EntriesExpireAndMatchOnlyTheirHash(t *testing.T) {
	t.Parallel()
	c := newAuthCache(time.Minute)
	h := []byte("$2a$04$hash-one")
	now := time.Now()
	c.put("app", h, "s3cret", now)
	for _, tc := range []struct {
		name       string
		hash, pass string
		at         time.Duration
		want       bool
	}{
		{"same password within the ttl", string(h), "s3cret", 59 * time.Second, true},
		{"at the ttl", string(h), "s3cret", time.Minute, false},
		{"another password", string(h), "s3cret2", 0, false},
		{"the users file has another hash", "$2a$04$hash-two", "s3cret", 0, false},
	} {
		if got := c.hit("app", []byte(tc.hash), tc.pass, now.Add(tc.at)); got != tc.want {
			t.Errorf("%s: hit = %v, want %v", tc.name, got, tc.want)
		}
	}
	if c.hit("nobody", h, "s3cret", now) {
		t.Error("a user without an entry hit")
	}
	// The entry is an HMAC under a key drawn per process: another
	// process's cache (or a table computed ahead) cannot match it.
	if other := newAuthCache(time.Minute); other.sum("app", "s3cret") == c.sum("app", "s3cret") {
		t.Error("two caches hold the same value for one password: the key is not random")
	}
}

// The cache stays bounded, whatever the number of users.
func TestAuthCache_Bounded(t *testing.T) {
	t.Parallel()
	c := newAuthCache(time.Minute)
	now := time.Now()
	for i := range authCacheMax + 10 {
		c.put("u"+string(rune(i)), []byte("h"), "p", now)
	}
	if len(c.m) > authCacheMax {
		t.Errorf("%d entries, want at most %d", len(c.m), authCacheMax)
	}
	c.put("last", []byte("h"), "p", now)
	if !c.hit("last", []byte("h"), "p", now) {
		t.Error("the newest entry was evicted")
	}
}

// A storm of logins runs bcrypt in at most the configured number of
// slots; the rest wait instead of taking every CPU from the mail.
func TestAuth_BcryptComparesShareBoundedSlots(t *testing.T) {
	t.Parallel()
	users := filepath.Join(t.TempDir(), "users")
	writeUsers(t, users, "app", "s3cret")
	var mu sync.Mutex
	var now, peak int
	tr := startTuned(t, []*recorder{{name: "a"}}, nil, func(c *Config) { c.Listen.Auth.UsersFile = users },
		func(r *Relay) {
			r.intake.authFailDelay = time.Millisecond
			r.intake.bcryptSlots = make(chan struct{}, 1)
			real := r.intake.compare
			r.intake.compare = func(h, p []byte) error {
				mu.Lock()
				now++
				peak = max(peak, now)
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
				mu.Lock()
				now--
				mu.Unlock()
				return real(h, p)
			}
		})
	var wg sync.WaitGroup
	codes := make([]int, 6)
	for i := range codes {
		wg.Go(func() { codes[i] = smtpCode(login(t, tr.smtp, "app", "wrong")) })
	}
	wg.Wait()
	if slices.ContainsFunc(codes, func(c int) bool { return c != 535 }) {
		t.Errorf("replies %v, want 535 for each", codes)
	}
	if peak != 1 {
		t.Errorf("%d bcrypt compares ran at once, want 1 (the slots)", peak)
	}
}

// Unknown users are checked against a dummy of the cost the file's own
// hashes have, so a refusal takes as long whether or not the user exists.
func TestLoadUsers_DummyHasTheFilesCost(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var lines []string
	for i, cost := range []int{5, 5, 6} {
		h, _ := bcrypt.GenerateFromPassword([]byte("pw"), cost)
		lines = append(lines, "u"+string(rune('a'+i))+":"+string(h))
	}
	path := filepath.Join(dir, "users")
	os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
	u, err := loadUsers(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := u.newDummy(nil); err != nil {
		t.Fatal(err)
	}
	if c, _ := bcrypt.Cost(u.dummy); c != 5 {
		t.Errorf("dummy cost %d, want 5 (two of the three hashes)", c)
	}
	again, _ := loadUsers(path)
	again.newDummy(u)
	if &again.dummy[0] != &u.dummy[0] {
		t.Error("a reload with the same cost made a new dummy")
	}
}

func TestLoadUsers_RefusesWhatBcryptCannotCheck(t *testing.T) {
	t.Parallel()
	h18 := "$2a$18$" + strings.Repeat("a", 53)
	for _, tc := range []struct{ line, want string }{
		{"app:$2a$10$tooshort", `line 1: user "app": not a whole bcrypt hash`},
		{"app:" + h18, `line 1: user "app": bcrypt cost 18 is above 17`},
		{"app:{SHA}abc", `line 1: user "app": only bcrypt hashes are supported`},
	} {
		path := filepath.Join(t.TempDir(), "users")
		os.WriteFile(path, []byte(tc.line+"\n"), 0o600)
		cfg, err := Load("../relay.yaml")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Listen.Auth.UsersFile = path
		err = cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), "listen.auth.users_file") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want listen.auth.users_file: %s", tc.line, err, tc.want)
		}
	}
}
