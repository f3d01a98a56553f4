package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/internal/testwait"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// recorder is a scripted upstream: it returns the scripted errors in order
// (nil = accept) and records every accepted message.
type recorder struct {
	name string
	mu   sync.Mutex
	errs []error
	got  []sent
	ids  []string // Message-ID of every call
	seen int
}

func (r *recorder) Name() string { return r.name }
func (r *recorder) Send(_ context.Context, m *upstreams.Message) (upstreams.Receipt, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen++
	r.ids = append(r.ids, m.MessageID)
	if len(r.errs) > 0 {
		err := r.errs[0]
		r.errs = r.errs[1:]
		if p, ok := err.(partial); ok {
			return upstreams.Receipt(p), nil
		}
		if err != nil {
			return upstreams.Receipt{}, err
		}
	}
	data, err := io.ReadAll(m.Reader())
	if err != nil {
		return upstreams.Receipt{}, err
	}
	cp := *m
	cp.To = slices.Clone(m.To)
	r.got = append(r.got, sent{Message: cp, Data: data})
	return upstreams.Receipt{ProviderID: fmt.Sprintf("%s-%d", r.name, len(r.got))}, nil
}

// partial scripts a partial delivery among a recorder's errs: the recorder
// returns it as the receipt, with no error.
type partial upstreams.Receipt

func (partial) Error() string { return "partial delivery (scripted)" }

// sent is a message a recorder accepted, with its body read at the time:
// the spool file behind Body is gone once the delivery is recorded.
type sent struct {
	upstreams.Message
	Data []byte
}

func (r *recorder) accepted() []sent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}
func (r *recorder) calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen
}

func uerr(c upstreams.Class, reason string) error {
	return &upstreams.Error{Upstream: "x", Class: c, Reason: reason}
}

type testRelay struct {
	*Relay
	smtp  string
	admin string
	dir   string
	stop  func()
}

// startRelay runs an in-process relay with the given upstream recorders;
// edit lets a test adjust the config first.
func startRelay(t *testing.T, ups []*recorder, routes []policy.RouteConfig, edit func(*Config)) *testRelay {
	return startRelayTB(t, ups, routes, edit, true, nil)
}

func startRelayB(b *testing.B, ups []*recorder) *testRelay {
	return startRelayTB(b, ups, nil, nil, false, nil)
}

// startRelayTB is startRelay for tests and benchmarks; tune, if set, adjusts
// the Relay between New and Run (fields tests shorten, such as the AUTH
// failure delay).
func startRelayTB(t testing.TB, ups []*recorder, routes []policy.RouteConfig, edit func(*Config), logs bool, tune func(*Relay), fsys ...spool.FS) *testRelay {
	t.Helper()
	return startRelayDeps(t, ups, routes, edit, logs, tune, nil, fsys...)
}

// startRelayDeps is startRelayTB with deps, if set, adjusting the relay's
// Deps before New (a test clock).
func startRelayDeps(t testing.TB, ups []*recorder, routes []policy.RouteConfig, edit func(*Config), logs bool, tune func(*Relay), deps func(*Deps), fsys ...spool.FS) *testRelay {
	t.Helper()
	dir := t.TempDir()
	cfg := Default()
	cfg.Listen.Address = "127.0.0.1:0"
	cfg.Admin.Address = "127.0.0.1:0"
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	cfg.Spool.Retry = policy.RetryConfig{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond, Multiplier: 2}
	cfg.Spool.Workers = 4
	cfg.ShutdownGrace = 2 * time.Second
	over := map[string]upstreams.Upstream{}
	for _, u := range ups {
		c := upstreams.Config{Name: u.name, Type: "file", Dir: dir}
		c.ApplyDefaults()
		cfg.Upstreams = append(cfg.Upstreams, c)
		over[u.name] = u
	}
	cfg.Routes = routes
	if cfg.Routes == nil {
		var names []string
		for _, u := range ups {
			names = append(names, u.name)
		}
		cfg.Routes = []policy.RouteConfig{{Name: "default", Upstreams: names, Strategy: "failover"}}
	}
	if edit != nil {
		edit(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	if logs {
		log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	d := Deps{Logger: log, Upstreams: over}
	if len(fsys) > 0 {
		d.SpoolFS = fsys[0]
	}
	if deps != nil {
		deps(&d)
	}
	r, err := New(&cfg, d)
	if err != nil {
		t.Fatal(err)
	}
	if tune != nil {
		tune(r)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	tr := &testRelay{Relay: r, smtp: r.SMTPAddr().String(), admin: r.AdminAddr().String(), dir: cfg.Spool.Dir}
	var once sync.Once
	tr.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("relay did not stop")
			}
		})
	}
	t.Cleanup(tr.stop)
	return tr
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (tr *testRelay) send(from string, to []string, data string) error {
	c, err := smtp.Dial(tr.smtp)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.SendMail(from, to, strings.NewReader(data))
}

const simpleMsg = "From: a@example.com\r\nTo: b@example.net\r\nSubject: test\r\n\r\nhello\r\n"

// waitFor polls cond for up to 5s.
// waitFor and smtpCode are thin wrappers over internal/testwait, kept
// because many files of this package call them.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, 5*time.Second, what, cond)
}

func smtpCode(err error) int { return testwait.SMTPCode(err) }

// waitDead waits until n messages are dead-lettered and no worker holds
// one (the move into dead/ is complete).
func (tr *testRelay) waitDead(t *testing.T, n int) {
	t.Helper()
	waitFor(t, "dead letter", func() bool { return len(tr.deadEnvelopes(t)) == n && tr.queue.len() == 0 })
}

func (tr *testRelay) deadEnvelopes(t *testing.T) []*Envelope {
	envs, err := tr.spool.Dead()
	if err != nil {
		t.Fatal(err)
	}
	return envs
}

func TestRelay_DeliversAndEmptiesSpool(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	msg := "From: a@example.com\r\nTo: b@example.net\r\nX-Relay-Route: x\r\nSubject: test\r\n\r\nhello\r\n"
	if err := tr.send("a@example.com", []string{"b@example.net", "c@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	m := a.accepted()[0]
	if m.From != "a@example.com" || !slices.Equal(m.To, []string{"b@example.net", "c@example.org"}) {
		t.Errorf("envelope = %s %v", m.From, m.To)
	}
	if strings.Contains(string(m.Data), "X-Relay-") || !strings.Contains(string(m.Data), "Message-Id: "+m.MessageID) {
		t.Errorf("data not prepared: %q", m.Data)
	}
	waitFor(t, "empty spool", func() bool {
		envs, _ := tr.spool.List()
		return len(envs) == 0 && tr.queue.len() == 0
	})
}

// A message the provider refused as bad must not be tried elsewhere.
func TestDelivery_RejectedGoesToDeadLetter(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Rejected, "550 5.1.1 no such user")}}
	b := &recorder{name: "b"}
	tr := startRelay(t, []*recorder{a, b}, nil, nil)
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
		t.Fatal(err)
	}
	tr.waitDead(t, 1)
	d := tr.deadEnvelopes(t)[0]
	if !strings.Contains(d.DeadReason, "550 5.1.1 no such user") || d.DeadAt == nil {
		t.Errorf("dead reason = %q", d.DeadReason)
	}
	if b.calls() != 0 {
		t.Errorf("b was tried %d times; rejected must not fail over", b.calls())
	}
	if _, err := os.Stat(filepath.Join(tr.dir, "dead", d.ID+".msg")); err != nil {
		t.Errorf("dead letter file: %v", err)
	}
}

func TestDelivery_FailoverOnTransientProviderFaultSenderRejected(t *testing.T) {
	t.Parallel()
	for _, c := range []upstreams.Class{upstreams.Transient, upstreams.ProviderFault, upstreams.SenderRejected, upstreams.Unsupported} {
		t.Run(c.String(), func(t *testing.T) {
			a := &recorder{name: "a", errs: []error{uerr(c, "nope")}}
			b := &recorder{name: "b"}
			tr := startRelay(t, []*recorder{a, b}, nil, nil)
			if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "failover", func() bool { return len(b.accepted()) == 1 })
			if a.calls() != 1 || len(a.accepted()) != 0 {
				t.Errorf("a calls = %d", a.calls())
			}
		})
	}
}

// The provider may have the message after a timeout mid-request: retry only
// that provider, never silently both.
func TestDelivery_AmbiguousRetriesSameUpstream(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Ambiguous, "timeout after DATA"), uerr(upstreams.Transient, "421")}}
	b := &recorder{name: "b"}
	tr := startRelay(t, []*recorder{a, b}, nil, nil)
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	waitFor(t, "delivery via a", func() bool { return len(a.accepted()) == 1 })
	if b.calls() != 0 {
		t.Errorf("b was tried after an ambiguous outcome at a")
	}
	if a.calls() != 3 {
		t.Errorf("a calls = %d, want 3", a.calls())
	}
	// All three attempts carried the same Message-ID.
	if id := a.accepted()[0].MessageID; id == "" {
		t.Error("no Message-ID")
	}
}

func TestDelivery_AmbiguousFailoverWhenConfigured(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Ambiguous, "timeout after DATA")}}
	b := &recorder{name: "b"}
	tr := startRelay(t, []*recorder{a, b}, nil, func(c *Config) { c.Spool.OnAmbiguous = "failover" })
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	waitFor(t, "failover", func() bool { return len(b.accepted()) == 1 })
}

func TestDelivery_StableMessageIDAcrossAttempts(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Transient, "busy"), uerr(upstreams.Ambiguous, "timeout")}}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	tr.send("a@example.com", []string{"b@example.net"}, "Subject: no id\r\n\r\nbody\r\n")
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	a.mu.Lock()
	ids := slices.Compact(slices.Clone(a.ids))
	a.mu.Unlock()
	if len(ids) != 1 || a.calls() != 3 {
		t.Fatalf("Message-IDs over %d attempts: %v", a.calls(), ids)
	}
	if !strings.Contains(string(a.accepted()[0].Data), "Message-Id: "+ids[0]+"\r\n") {
		t.Errorf("header does not carry %s", ids[0])
	}
}

func TestDelivery_PartialRecipients(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{partial{ProviderID: "a-partial", Refused: []upstreams.Refusal{{Rcpt: "bad@example.net",
		Err: &upstreams.Error{Upstream: "a", Class: upstreams.Rejected, Reason: "550 no such user"}}}}}}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	tr.send("a@example.com", []string{"ok@example.net", "bad@example.net"}, simpleMsg)
	tr.waitDead(t, 1)
	d := tr.deadEnvelopes(t)[0]
	if len(d.Deliveries) != 1 || !slices.Equal(d.Deliveries[0].Rcpts, []string{"ok@example.net"}) || d.Deliveries[0].ProviderID != "a-partial" {
		t.Errorf("deliveries = %+v", d.Deliveries)
	}
	if len(d.Failures) != 1 || !slices.Equal(d.Failures[0].Rcpts, []string{"bad@example.net"}) {
		t.Errorf("failures = %+v", d.Failures)
	}
	// Retrying the dead letter resends only to the failed recipient.
	if err := tr.Retry(d.ID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "retried delivery", func() bool { return len(a.accepted()) == 1 })
	if got := a.accepted()[0].To; !slices.Equal(got, []string{"bad@example.net"}) {
		t.Errorf("retry went to %v", got)
	}
}

// Each refused recipient goes on by its own refusal: the rejected one is
// dead-lettered, the transient one fails over, the delivered one is not
// sent again.
func TestDelivery_PartialRefusalsByClass(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{partial{ProviderID: "a-partial", Refused: []upstreams.Refusal{
		{Rcpt: "bad@example.net", Err: &upstreams.Error{Upstream: "a", Class: upstreams.Rejected, Reason: "550 no such user"}},
		{Rcpt: "later@example.net", Err: &upstreams.Error{Upstream: "a", Class: upstreams.Transient, Reason: "451 try later"}},
	}}}}
	b := &recorder{name: "b"}
	tr := startRelay(t, []*recorder{a, b}, nil, nil)
	tr.send("a@example.com", []string{"ok@example.net", "bad@example.net", "later@example.net"}, simpleMsg)
	tr.waitDead(t, 1)
	d := tr.deadEnvelopes(t)[0]
	if len(d.Deliveries) != 2 || !slices.Equal(d.Deliveries[0].Rcpts, []string{"ok@example.net"}) || d.Deliveries[0].ProviderID != "a-partial" ||
		d.Deliveries[1].Upstream != "b" || !slices.Equal(d.Deliveries[1].Rcpts, []string{"later@example.net"}) {
		t.Errorf("deliveries = %+v", d.Deliveries)
	}
	if len(d.Failures) != 1 || !slices.Equal(d.Failures[0].Rcpts, []string{"bad@example.net"}) || !strings.Contains(d.Failures[0].Reason, "550 no such user") {
		t.Errorf("failures = %+v", d.Failures)
	}
	if got := b.accepted(); len(got) != 1 || !slices.Equal(got[0].To, []string{"later@example.net"}) {
		t.Errorf("b got %+v", got)
	}
}

func TestDelivery_SplitPerRoute(t *testing.T) {
	t.Parallel()
	eu := &recorder{name: "eu"}
	def := &recorder{name: "def"}
	routes := []policy.RouteConfig{
		{Name: "eu", Match: &policy.Match{RecipientDomains: []string{"example.de"}}, Upstreams: []string{"eu"}},
		{Name: "default", Upstreams: []string{"def"}},
	}
	tr := startRelay(t, []*recorder{eu, def}, routes, nil)
	tr.send("a@example.com", []string{"x@example.de", "y@example.net", "z@example.de"}, simpleMsg)
	waitFor(t, "both routes", func() bool { return len(eu.accepted()) == 1 && len(def.accepted()) == 1 })
	if got := eu.accepted()[0].To; !slices.Equal(got, []string{"x@example.de", "z@example.de"}) {
		t.Errorf("eu got %v", got)
	}
	if got := def.accepted()[0].To; !slices.Equal(got, []string{"y@example.net"}) {
		t.Errorf("default got %v", got)
	}
	if eu.accepted()[0].MessageID != def.accepted()[0].MessageID {
		t.Error("routes saw different Message-IDs")
	}
}

func TestDelivery_MaxAgeDeadLetters(t *testing.T) {
	t.Parallel()
	var errs []error
	for range 100 {
		errs = append(errs, uerr(upstreams.Transient, "421 try later"))
	}
	a := &recorder{name: "a", errs: errs}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Spool.MaxAge = 300 * time.Millisecond })
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	tr.waitDead(t, 1)
	d := tr.deadEnvelopes(t)[0]
	if !strings.Contains(d.DeadReason, "max age") || !strings.Contains(d.DeadReason, "421 try later") || d.Attempts < 2 {
		t.Errorf("dead = %q after %d attempts", d.DeadReason, d.Attempts)
	}
}

func TestSMTP_Refusals(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Listen.MaxMessageBytes = 2000
		c.Listen.MaxRecipients = 2
		c.Listen.AllowedSenders = []string{"example.com"}
	})
	big := simpleMsg + strings.Repeat("x", 3000) + "\r\n"
	for _, tc := range []struct {
		name string
		from string
		to   []string
		data string
		code int
	}{
		{"too big", "a@example.com", []string{"b@example.net"}, big, 552},
		{"too many rcpts", "a@example.com", []string{"b@example.net", "c@example.net", "d@example.net"}, simpleMsg, 452},
		{"sender domain", "a@example.org", []string{"b@example.net"}, simpleMsg, 550},
		{"bad rcpt", "a@example.com", []string{"not-an-address"}, simpleMsg, 501},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tr.send(tc.from, tc.to, tc.data)
			if smtpCode(err) != tc.code {
				t.Errorf("got %v, want %d", err, tc.code)
			}
			if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
				t.Errorf("relay stopped serving: %v", err)
			}
		})
	}
}

// rawSession speaks SMTP with exact bytes, for payloads a client library
// would normalise.
func rawSession(t *testing.T, addr string, lines ...string) []string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	var replies []string
	read := func() {
		var full string
		for {
			l, err := br.ReadString('\n')
			full += l
			if err != nil || len(l) < 4 || l[3] != '-' {
				break
			}
		}
		replies = append(replies, strings.TrimSpace(full))
	}
	read() // greeting
	for _, l := range lines {
		c.Write([]byte(l))
		if strings.HasPrefix(l, "Subject") {
			continue // DATA body: reply comes after the final dot
		}
		read()
	}
	return replies
}

// Models the SMTP smuggling family (CVE-2023-51764): a bare-LF "end of
// data" hiding a second transaction.
func TestSMTP_BareLFSmugglingRefused(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	replies := rawSession(t, tr.smtp,
		"EHLO test\r\n", "MAIL FROM:<a@example.com>\r\n", "RCPT TO:<b@example.net>\r\n", "DATA\r\n",
		"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.net>\nDATA\nSmuggled\r\n.\r\n",
		"QUIT\r\n")
	var dataReply string
	for _, r := range replies {
		if strings.HasPrefix(r, "550") {
			dataReply = r
		}
	}
	if !strings.HasPrefix(dataReply, "550 5.6.0") {
		t.Fatalf("replies = %q, want a 550 5.6.0", replies)
	}
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
		t.Fatalf("relay stopped serving: %v", err)
	}
	waitFor(t, "the good message", func() bool { return len(a.accepted()) == 1 })
	time.Sleep(100 * time.Millisecond)
	if n := len(a.accepted()); n != 1 || strings.Contains(string(a.accepted()[0].Data), "Smuggled") {
		t.Errorf("%d messages delivered; smuggled content leaked", n)
	}
}

func TestSMTP_BareLFNormalize(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.BareLF = "normalize" })
	replies := rawSession(t, tr.smtp, "EHLO test\r\n", "MAIL FROM:<a@example.com>\r\n", "RCPT TO:<b@example.net>\r\n", "DATA\r\n",
		"Subject: x\r\n\r\nline1\nline2\r\n.\r\n", "QUIT\r\n")
	if !slices.ContainsFunc(replies, func(r string) bool { return strings.HasPrefix(r, "250 2.0.0 OK: queued as ") }) {
		t.Fatalf("replies = %q", replies)
	}
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	if !strings.Contains(string(a.accepted()[0].Data), "line1\r\nline2\r\n") {
		t.Errorf("not normalized: %q", a.accepted()[0].Data)
	}
}

func TestSMTP_NetworkNotAllowed(t *testing.T) {
	t.Parallel()
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, func(c *Config) { c.Listen.AllowedNetworks = []string{"10.0.0.0/8"} })
	c, err := net.Dial("tcp", tr.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	if !strings.HasPrefix(line, "554 5.7.1") {
		t.Errorf("greeting = %q, want 554 5.7.1", line)
	}
}

func TestSMTP_NoRouteAndTooBigForRoute(t *testing.T) {
	t.Parallel()
	small := &recorder{name: "small"}
	routes := []policy.RouteConfig{{Name: "de", Match: &policy.Match{RecipientDomains: []string{"example.de"}}, Upstreams: []string{"small"}}}
	tr := startRelay(t, []*recorder{small}, routes, func(c *Config) { c.Upstreams[0].MaxMessageBytes = 1000 })
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); smtpCode(err) != 550 {
		t.Errorf("unrouted recipient: %v, want 550", err)
	}
	big := simpleMsg + strings.Repeat("y", 1200) + "\r\n"
	if err := tr.send("a@example.com", []string{"b@example.de"}, big); smtpCode(err) != 552 {
		t.Errorf("too big for the route: %v, want 552", err)
	}
	// EHLO advertises the route's limit, not the listener's 25 MiB.
	c, _ := smtp.Dial(tr.smtp)
	defer c.Close()
	c.Hello("x")
	if _, v := c.Extension("SIZE"); v != "1000" {
		t.Errorf("SIZE = %q, want 1000", v)
	}
}

// Models a full disk: the client must get a temporary failure and the relay
// must keep nothing.
func TestSMTP_SpoolWriteFailureIs451(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	sw := &switchFS{}
	tr := startRelayTB(t, []*recorder{a}, nil, nil, true, nil, sw)
	sw.full.Store(true)
	err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 451 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 0}) {
		t.Fatalf("got %v, want 451 4.3.0", err)
	}
	if strings.Contains(se.Message, tr.dir) || strings.Contains(se.Message, "no space") {
		t.Errorf("reply leaks detail: %q", se.Message)
	}
	envs, _ := tr.spool.List()
	if len(envs) != 0 || len(dirNames(t, tr.dir)) != 2 { // dead/ and .lock
		t.Errorf("spool after failure: %v", dirNames(t, tr.dir))
	}
	sw.full.Store(false)
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
		t.Errorf("after the disk recovered: %v", err)
	}
}

func TestSMTP_Auth(t *testing.T) {
	t.Parallel()
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("# comment\napp:"+string(hash)+"\n"), 0o600)
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.Auth.UsersFile = users })

	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); smtpCode(err) != 530 {
		t.Errorf("unauthenticated MAIL: %v, want 530", err)
	}
	for _, mech := range []sasl.Client{sasl.NewPlainClient("", "app", "s3cret"), sasl.NewLoginClient("app", "s3cret")} {
		c, _ := smtp.Dial(tr.smtp)
		if err := c.Auth(mech); err != nil {
			t.Fatalf("auth: %v", err)
		}
		if err := c.SendMail("a@example.com", []string{"b@example.net"}, strings.NewReader(simpleMsg)); err != nil {
			t.Errorf("authenticated send: %v", err)
		}
		c.Close()
	}
	c, _ := smtp.Dial(tr.smtp)
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", "app", "wrong")); smtpCode(err) != 535 {
		t.Errorf("bad password: %v, want 535", err)
	}
	waitFor(t, "two deliveries", func() bool { return len(a.accepted()) == 2 })
	if !strings.Contains(string(a.accepted()[0].Data), "with ESMTPA") {
		t.Errorf("Received does not record authentication")
	}
}

func TestAdmin_QueueRetryDrop(t *testing.T) {
	t.Parallel()
	var errs []error
	for range 1000 {
		errs = append(errs, uerr(upstreams.Transient, "down"))
	}
	a := &recorder{name: "a", errs: errs}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Spool.Retry = policy.RetryConfig{Initial: time.Hour, Max: time.Hour, Multiplier: 1}
	})
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	tr.send("a@example.com", []string{"c@example.net"}, simpleMsg)
	var list []QueueEntry
	waitFor(t, "two failed attempts", func() bool {
		resp, err := http.Get("http://" + tr.admin + "/api/queue")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		list = nil
		json.NewDecoder(resp.Body).Decode(&list)
		return len(list) == 2 && list[0].Attempts == 1 && list[1].Attempts == 1
	})
	if list[0].LastError == "" || list[0].Sender != "a@example.com" || list[0].NextAttempt.Before(time.Now().Add(30*time.Minute)) {
		t.Errorf("entry = %+v", list[0])
	}
	req, _ := http.NewRequest(http.MethodPost, "http://"+tr.admin+"/api/queue/"+list[0].ID+"/retry", nil)
	req.Header.Set("X-Relaycar-Request", "1")
	resp, _ := http.DefaultClient.Do(req)
	resp.Body.Close()
	waitFor(t, "retry", func() bool { return a.calls() == 3 })
	req, _ = http.NewRequest(http.MethodDelete, "http://"+tr.admin+"/api/queue/"+list[1].ID, nil)
	req.Header.Set("X-Relaycar-Request", "1")
	resp, _ = http.DefaultClient.Do(req)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("drop: %s", resp.Status)
	}
	resp, _ = http.DefaultClient.Do(req)
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("second drop: %s, want 404", resp.Status)
	}
	for _, p := range []string{"/healthz", "/readyz", "/metrics", "/", "/api/dead"} {
		resp, err := http.Get("http://" + tr.admin + p)
		if err != nil || resp.StatusCode != 200 {
			t.Errorf("GET %s: %v %v", p, err, resp.Status)
		}
		resp.Body.Close()
	}
	tr.stop()
	if _, err := http.Get("http://" + tr.admin + "/readyz"); err == nil {
		t.Error("admin still serving after stop")
	}
}

func TestReadyz_SpoolNotWritable(t *testing.T) {
	t.Parallel()
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	get := func() int {
		resp, err := http.Get("http://" + tr.admin + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	waitFor(t, "ready", func() bool { return get() == 200 })
	// Replace the spool dir by a file (root ignores permission bits).
	os.Rename(tr.dir, tr.dir+".moved")
	os.WriteFile(tr.dir, []byte("x"), 0o600)
	if code := get(); code != 503 {
		t.Errorf("readyz with unwritable spool = %d, want 503", code)
	}
	os.Remove(tr.dir)
	os.Rename(tr.dir+".moved", tr.dir)
}

// Models the disk filling up between attempts: the attempt bookkeeping
// cannot be written, but the message must stay queued and be delivered.
func TestDelivery_UpdateFailureKeepsMessageQueued(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Transient, "busy"), uerr(upstreams.Transient, "busy")}}
	sw := &switchFS{}
	tr := startRelayTB(t, []*recorder{a}, nil, func(c *Config) {
		c.Spool.Retry = policy.RetryConfig{Initial: time.Hour, Max: time.Hour, Multiplier: 1}
	}, true, nil, sw)
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	waitFor(t, "first attempt", func() bool { return a.calls() == 1 })
	sw.full.Store(true)
	envs, _ := tr.spool.List()
	if len(envs) != 1 {
		t.Fatalf("spool has %d messages", len(envs))
	}
	// Two more attempts, each unable to write its bookkeeping; the third
	// is accepted.
	waitFor(t, "delivery", func() bool {
		tr.Retry(envs[0].ID) // errBusy while in flight; not found once delivered
		return len(a.accepted()) == 1 && tr.queue.len() == 0
	})
	if a.calls() != 3 {
		t.Errorf("upstream called %d times, want 3", a.calls())
	}
}

func TestSMTP_StartTLS(t *testing.T) {
	t.Parallel()
	cert := testsmtp.NewCert(t)
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Listen.TLS = TLSConfig{CertFile: cert.CertFile, KeyFile: cert.KeyFile}
	})
	c, err := smtp.DialStartTLS(tr.smtp, &tls.Config{RootCAs: cert.Pool, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail("a@example.com", []string{"b@example.net"}, strings.NewReader(simpleMsg)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	if !strings.Contains(string(a.accepted()[0].Data), "with ESMTPS id") {
		t.Errorf("Received does not record TLS: %q", a.accepted()[0].Data)
	}
}

// The admin port listens on the pod IP for probes and scrapes; only a
// shell in the pod may change the queue.
func TestAdmin_QueueChangesOnlyFromLoopback(t *testing.T) {
	t.Parallel()
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	h := tr.api.handler()
	for _, tc := range []struct {
		method, path, remote string
		want                 int
	}{
		{http.MethodPost, "/api/queue/retry", "10.1.2.3:4000", http.StatusForbidden},
		{http.MethodDelete, "/api/queue/abc", "[2001:db8::1]:4000", http.StatusForbidden},
		{http.MethodPost, "/api/queue/abc/retry", "192.168.1.1:4000", http.StatusForbidden},
		{http.MethodPost, "/api/queue/retry", "127.0.0.1:4000", http.StatusOK},
		{http.MethodDelete, "/api/queue/abc", "[::1]:4000", http.StatusNotFound},
		{http.MethodGet, "/api/queue", "10.1.2.3:4000", http.StatusOK},
		{http.MethodGet, "/metrics", "10.1.2.3:4000", http.StatusOK},
	} {
		req := httptest.NewRequest(tc.method, tc.path, nil)
		req.Host = "127.0.0.1:9025"
		req.Header.Set("X-Relaycar-Request", "1")
		req.RemoteAddr = tc.remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("%s %s from %s = %d, want %d", tc.method, tc.path, tc.remote, rec.Code, tc.want)
		}
	}
}

func TestMetrics_OldestMessageAge(t *testing.T) {
	t.Parallel()
	var errs []error
	for range 100 {
		errs = append(errs, uerr(upstreams.Transient, "down"))
	}
	tr := startRelay(t, []*recorder{{name: "a", errs: errs}}, nil, func(c *Config) {
		c.Spool.Retry = policy.RetryConfig{Initial: time.Hour, Max: time.Hour, Multiplier: 1}
	})
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	time.Sleep(50 * time.Millisecond)
	resp, err := http.Get("http://" + tr.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var age float64
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "relaycar_spool_oldest_message_age_seconds "); ok {
			fmt.Sscan(v, &age)
		}
	}
	if age <= 0 || age > 5 {
		t.Errorf("oldest age = %v, want a small positive number", age)
	}
}
