package relay

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// quotaUp is an upstream whose provider answers quota reads from a script;
// the last answer repeats.
type quotaUp struct {
	*recorder
	mu      sync.Mutex
	answers []quotaAnswer
	reads   int
}

type quotaAnswer struct {
	q   upstreams.Quota
	err error
}

func (u *quotaUp) Quota(context.Context) (upstreams.Quota, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	a := u.answers[min(u.reads, len(u.answers)-1)]
	u.reads++
	return a.q, a.err
}

func (u *quotaUp) readCount() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.reads
}

// quotaFixture is a quota watch over one from_provider upstream with a
// ticker the test fires.
type quotaFixture struct {
	w    *quotaWatch
	up   *quotaUp
	gate *policy.Gate
	m    *quotaMetrics
	tick chan time.Time
	logs *fakes.Logs
}

func newQuotaFixture(t *testing.T, perSecond float64, answers ...quotaAnswer) *quotaFixture {
	t.Helper()
	up := &quotaUp{recorder: &recorder{name: "ses"}, answers: answers}
	c := upstreams.Config{Name: "ses", Type: "ses", Region: "us-east-1",
		RateLimit: upstreams.RateLimit{PerSecond: perSecond, Burst: 1, MaxWait: 200 * time.Millisecond, FromProvider: true}}
	c.ApplyDefaults()
	gate := policy.NewGate(up, c, policy.GateHooks{})
	log, logs := fakes.NewLogger()
	m := newQuotaMetrics(prometheus.NewRegistry())
	w := newQuotaWatch([]upstreams.Config{c}, func(string) (upstreams.Upstream, *policy.Gate, float64) { return up, gate, perSecond }, m, log)
	f := &quotaFixture{w: w, up: up, gate: gate, m: m, tick: make(chan time.Time), logs: logs}
	w.newTicker = func(d time.Duration) (<-chan time.Time, func()) {
		if d != 5*time.Minute {
			t.Errorf("quota re-read every %s, want 5m", d)
		}
		return f.tick, func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w.start(ctx)
	return f
}

func (f *quotaFixture) admit() policy.Skip {
	return f.gate.Admit(context.Background(), policy.Ask{Size: 10, Rcpts: 1})
}

func (f *quotaFixture) gauge(g *prometheus.GaugeVec) float64 {
	var m dto.Metric
	if err := g.WithLabelValues("ses").Write(&m); err != nil {
		panic(err)
	}
	return m.GetGauge().GetValue()
}

// fire ticks and waits until done says the read was applied.
func (f *quotaFixture) fire(t *testing.T, what string, done func() bool) {
	t.Helper()
	f.tick <- time.Now()
	waitFor(t, what, done)
}

// SES lowered the account's rate below per_second: the gate follows it.
func TestQuota_MaxSendRateCapsTheGate(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 1000, quotaAnswer{q: upstreams.Quota{MaxSendRate: 0.5, Max24HourSend: -1, SendingEnabled: true}})
	if s := f.admit(); s != policy.NotSkipped {
		t.Fatalf("first message: %v", s)
	}
	// At 1000/s the next token comes in 1 ms; at SES's 0.5/s in 2 s,
	// beyond max_wait.
	if s := f.admit(); s != policy.SkipRateLimited {
		t.Errorf("second message at once: %v, want rate_limited (rate capped at 0.5/s)", s)
	}
	if v := f.gauge(f.m.maxSendRate); v != 0.5 {
		t.Errorf("max_send_rate gauge = %v, want 0.5", v)
	}
	if v := f.gauge(f.m.remaining24h); v != -1 {
		t.Errorf("remaining_24h gauge = %v, want -1 (unlimited)", v)
	}
}

// The provider's rate above per_second leaves per_second in charge.
func TestQuota_PerSecondBelowProviderRateStays(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 1000, quotaAnswer{q: upstreams.Quota{MaxSendRate: 5000, Max24HourSend: -1, SendingEnabled: true}})
	for i := range 3 {
		if s := f.admit(); s != policy.NotSkipped {
			t.Fatalf("message %d: %v", i, s)
		}
	}
}

// The 24-hour quota runs out through our own sends between two reads,
// a failed read keeps it, and the next good read frees the upstream.
func TestQuota_ExhaustedByLocalSendsThenFreed(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 1000,
		quotaAnswer{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 8, SendingEnabled: true}},
		quotaAnswer{err: &upstreams.Error{Upstream: "ses", Class: upstreams.Transient, Reason: "timeout"}},
		quotaAnswer{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 3, SendingEnabled: true}},
	)
	if v := f.gauge(f.m.remaining24h); v != 2 {
		t.Errorf("remaining_24h = %v, want 2", v)
	}
	f.w.sent("ses", 1)
	if s := f.admit(); s != policy.NotSkipped {
		t.Fatalf("one left: %v", s)
	}
	f.w.sent("ses", 1)
	if s := f.admit(); s != policy.SkipQuotaExhausted {
		t.Errorf("after using the quota: %v, want quota_exhausted", s)
	}
	if v := f.gauge(f.m.remaining24h); v != 0 {
		t.Errorf("remaining_24h = %v, want 0", v)
	}
	f.w.sent("other-upstream", 5) // not from_provider: ignored
	// GetAccount fails: the last known state stays.
	f.fire(t, "failed read logged", func() bool { return strings.Contains(f.logs.String(), "reading the provider quota failed") })
	if s := f.admit(); s != policy.SkipQuotaExhausted {
		t.Errorf("after a failed read: %v, want still quota_exhausted", s)
	}
	// The window moved: 3 of 10.
	f.fire(t, "quota freed", func() bool { return f.gauge(f.m.remaining24h) == 7 })
	if s := f.admit(); s != policy.NotSkipped {
		t.Errorf("after the quota freed: %v", s)
	}
	if v := f.gauge(f.m.remaining24h); v != 7 {
		t.Errorf("remaining_24h = %v, want 7", v)
	}
	for _, want := range []string{"provider 24-hour quota used up", "provider 24-hour quota available again"} {
		if !strings.Contains(f.logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, f.logs)
		}
	}
}

func TestQuota_SandboxWarnsAndExports(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 14, quotaAnswer{q: upstreams.Quota{MaxSendRate: 1, Max24HourSend: 200, Sandbox: true, SendingEnabled: true}})
	if v := f.gauge(f.m.sandbox); v != 1 {
		t.Errorf("sandbox gauge = %v, want 1", v)
	}
	if !strings.Contains(f.logs.String(), "level=WARN msg=\"provider account is in the sandbox") {
		t.Errorf("no sandbox warning:\n%s", f.logs)
	}
	f.fire(t, "second read", func() bool { return f.up.readCount() == 2 })
	f.tick <- time.Now() // taken only once the second read was applied
	if n := strings.Count(f.logs.String(), "is in the sandbox"); n != 1 {
		t.Errorf("sandbox warned %d times, want once (at start)", n)
	}
}

// An upstream that cannot report a quota (an embedder's) is left alone
// with a warning instead of failing the start.
func TestQuota_UpstreamWithoutQuotaReader(t *testing.T) {
	t.Parallel()
	c := upstreams.Config{Name: "x", Type: "ses", RateLimit: upstreams.RateLimit{PerSecond: 1, FromProvider: true}}
	log, logs := fakes.NewLogger()
	w := newQuotaWatch([]upstreams.Config{c}, func(string) (upstreams.Upstream, *policy.Gate, float64) { return &recorder{name: "x"}, nil, 1 },
		newQuotaMetrics(prometheus.NewRegistry()), log)
	w.start(context.Background())
	if len(w.ups) != 0 || !strings.Contains(logs.String(), "from_provider ignored") {
		t.Errorf("ups = %d, log:\n%s", len(w.ups), logs)
	}
}

// A reload that rebuilds the upstream (a rotated key) gives it a new gate,
// which starts uncapped and not exhausted: what is known of the quota
// carries over to it at once, not at the next read up to five minutes
// later. An upstream that turns from_provider by a reload is not watched
// until a restart, and the log says so.
func TestQuota_CarriedOverToAReloadsNewGate(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 1000, quotaAnswer{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 10, SendingEnabled: true}})
	if s := f.admit(); s != policy.SkipQuotaExhausted {
		t.Fatalf("before the reload: %v, want quota_exhausted", s)
	}
	c := upstreams.Config{Name: "ses", Type: "ses", Region: "us-east-1", Timeout: 31 * time.Second,
		RateLimit: upstreams.RateLimit{PerSecond: 1000, Burst: 1, MaxWait: 200 * time.Millisecond, FromProvider: true}}
	c.ApplyDefaults()
	rebuilt := policy.NewGate(f.up, c, policy.GateHooks{})
	f.w.current = func(string) (upstreams.Upstream, *policy.Gate, float64) { return f.up, rebuilt, 1000 }
	added := upstreams.Config{Name: "ses-eu", Type: "ses", Region: "eu-west-1", RateLimit: upstreams.RateLimit{FromProvider: true}}
	f.w.reloaded([]upstreams.Config{c, added})
	if s := rebuilt.Admit(context.Background(), policy.Ask{Size: 10, Rcpts: 1}); s != policy.SkipQuotaExhausted {
		t.Errorf("the reload's new gate: %v, want quota_exhausted carried over", s)
	}
	if !strings.Contains(f.logs.String(), "upstreams.ses-eu.rate_limit.from_provider") || !strings.Contains(f.logs.String(), "needs a restart") {
		t.Errorf("log lacks the restart warning for ses-eu:\n%s", f.logs)
	}
	if strings.Contains(f.logs.String(), "upstreams.ses.rate_limit") {
		t.Errorf("a warning for ses, whose from_provider did not change:\n%s", f.logs)
	}
	off := c
	off.RateLimit.FromProvider = false
	f.w.reloaded([]upstreams.Config{off})
	if !strings.Contains(f.logs.String(), "upstreams.ses.rate_limit.from_provider") {
		t.Errorf("from_provider turned off by a reload is not logged as needing a restart:\n%s", f.logs)
	}
}

// Through Relay.Reload: a changed setting rebuilds the upstream's gate, and
// the exhausted quota holds on the new one.
func TestQuota_ReloadKeepsTheQuotaOnARebuiltGate(t *testing.T) {
	t.Parallel()
	up := &quotaUp{recorder: &recorder{name: "ses"}, answers: []quotaAnswer{
		{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 10, SendingEnabled: true}}}}
	tr := startRelayDeps(t, []*recorder{up.recorder}, nil, func(c *Config) {
		c.Upstreams[0].Type, c.Upstreams[0].Region, c.Upstreams[0].Dir = "ses", "us-east-1", ""
		c.Upstreams[0].RateLimit = upstreams.RateLimit{PerSecond: 1000, Burst: 1, MaxWait: 200 * time.Millisecond, FromProvider: true}
	}, false, nil, func(d *Deps) { d.Upstreams["ses"] = up })
	admit := func() policy.Skip {
		return tr.engine.Load().gates["ses"].Admit(context.Background(), policy.Ask{Size: 10, Rcpts: 1})
	}
	waitFor(t, "the first quota read", func() bool { return admit() == policy.SkipQuotaExhausted })
	old := tr.engine.Load()
	cfg := *old.cfg
	cfg.Upstreams = slices.Clone(cfg.Upstreams)
	cfg.Upstreams[0].Timeout += time.Second
	if err := tr.Reload(&cfg); err != nil {
		t.Fatal(err)
	}
	if tr.engine.Load().gates["ses"] == old.gates["ses"] {
		t.Fatal("the reload kept the gate; the test needs a rebuilt one")
	}
	if s := admit(); s != policy.SkipQuotaExhausted {
		t.Errorf("after the reload: %v, want quota_exhausted", s)
	}
}

// A reload that lands while a quota read is applied (after the read
// looked up the gate, before it took the upstream's lock) must not be
// undone: the read's quota ends up on the reload's new gate, not stored
// back on the old one.
func TestQuota_ReloadDuringAReadKeepsTheNewGate(t *testing.T) {
	t.Parallel()
	f := newQuotaFixture(t, 1000,
		quotaAnswer{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 0, SendingEnabled: true}},
		quotaAnswer{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 10, SentLast24Hours: 10, SendingEnabled: true}})
	c := upstreams.Config{Name: "ses", Type: "ses", Region: "us-east-1", Timeout: 31 * time.Second,
		RateLimit: upstreams.RateLimit{PerSecond: 1000, Burst: 1, MaxWait: 200 * time.Millisecond, FromProvider: true}}
	c.ApplyDefaults()
	rebuilt := policy.NewGate(f.up, c, policy.GateHooks{})
	var (
		mu       sync.Mutex
		running  = f.gate
		lookups  int
		reloaded = make(chan struct{})
	)
	f.w.current = func(string) (upstreams.Upstream, *policy.Gate, float64) {
		mu.Lock()
		g := running
		lookups++
		second := lookups == 2 // the read's lookup once GetAccount answered
		if second {
			running = rebuilt // the reload swaps the engine...
		}
		mu.Unlock()
		if second {
			// ...and carries the quota over; it waits for the read if
			// the read holds the upstream's lock.
			go func() { f.w.reloaded([]upstreams.Config{c}); close(reloaded) }()
			select {
			case <-reloaded:
			case <-time.After(200 * time.Millisecond):
			}
		}
		return f.up, g, 1000
	}
	f.tick <- time.Now()
	select {
	case <-reloaded:
	case <-time.After(5 * time.Second):
		t.Fatal("the reload did not finish")
	}
	waitFor(t, "the second read applied", func() bool { return f.gauge(f.m.remaining24h) == 0 })
	if s := rebuilt.Admit(context.Background(), policy.Ask{Size: 10, Rcpts: 1}); s != policy.SkipQuotaExhausted {
		t.Errorf("the reload's gate after the read: %v, want quota_exhausted (the read's quota on the running gate)", s)
	}
}

// A redirect_all_to route sends to the redirect addresses only: the
// provider's 24-hour quota counts those, not the original recipients
// (as the rate limit already charges them).
func TestQuota_RedirectCountsTheRedirectAddresses(t *testing.T) {
	t.Parallel()
	up := &quotaUp{recorder: &recorder{name: "ses"}, answers: []quotaAnswer{
		{q: upstreams.Quota{MaxSendRate: 1000, Max24HourSend: 100, SentLast24Hours: 0, SendingEnabled: true}}}}
	routes := []policy.RouteConfig{{Name: "staging", Upstreams: []string{"ses"}, RedirectAllTo: []string{"qa@example.com"}}}
	tr := startRelayDeps(t, []*recorder{up.recorder}, routes, func(c *Config) {
		c.Upstreams[0].Type, c.Upstreams[0].Region, c.Upstreams[0].Dir = "ses", "us-east-1", ""
		c.Upstreams[0].RateLimit = upstreams.RateLimit{PerSecond: 1000, Burst: 10, MaxWait: 200 * time.Millisecond, FromProvider: true}
	}, false, nil, func(d *Deps) { d.Upstreams["ses"] = up })
	remaining := func() float64 {
		var m dto.Metric
		if err := tr.quotas.metrics.remaining24h.WithLabelValues("ses").Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetGauge().GetValue()
	}
	waitFor(t, "the first quota read", func() bool { return remaining() == 100 })
	rcpts := []string{"a@example.net", "b@example.net", "c@example.net", "d@example.net", "e@example.net"}
	if err := tr.send("s@example.com", rcpts, simpleMsg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the delivery", func() bool { return len(up.accepted()) == 1 && tr.queue.len() == 0 })
	if v := remaining(); v != 99 {
		t.Errorf("remaining_24h = %v after one message redirected to one address, want 99 (5 original recipients: 95)", v)
	}
}
