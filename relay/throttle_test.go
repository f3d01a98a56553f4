package relay

import (
	"context"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// offsetClock is real time plus an offset a test moves forward, so a test
// waits out a provider's pause without sleeping through it.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) advance(d time.Duration) { c.off.Add(int64(d)) }

// throttleScenario runs the contract of a throttle against upstream "a"
// (first in a failover route, circuit_breaker.failures: 1) and recorder
// "b": the throttled message fails over to b; the next two skip a
// (reason throttled) without a request to it; a's breaker stays closed;
// once the pause is over a takes mail again. requests counts what reached
// a; pause is how long a's answer asks for.
func throttleScenario(t *testing.T, a upstreams.Config, requests func() int, pause time.Duration) {
	t.Helper()
	var clock offsetClock
	b := &recorder{name: "b"}
	a.CircuitBreaker = upstreams.CircuitBreaker{Failures: 1, OpenFor: time.Hour}
	a.Timeout = 5 * time.Second
	a.ApplyDefaults()
	routes := []policy.RouteConfig{{Name: "default", Upstreams: []string{"a", "b"}, Strategy: "failover"}}
	tr := startRelayDeps(t, []*recorder{b}, routes, func(c *Config) {
		c.Upstreams = append(c.Upstreams, a)
	}, true, nil, func(d *Deps) { d.Now = clock.now })
	gate := tr.engine.Load().gates["a"]
	throttled := tr.metrics.skipped.WithLabelValues("a", policy.SkipThrottled.String())

	send := func(i int) {
		t.Helper()
		if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
			t.Fatalf("message %d refused: %v", i, err)
		}
	}
	send(1)
	waitFor(t, "message 1 to fail over to b", func() bool { return len(b.accepted()) == 1 && tr.queue.len() == 0 })
	if n := requests(); n != 1 {
		t.Fatalf("a got %d requests, want 1", n)
	}
	if until := gate.PausedUntil(); until.Before(clock.now().Add(pause - 5*time.Second)) {
		t.Fatalf("a paused until %v, want about now + %v", until, pause)
	}

	send(2)
	send(3)
	waitFor(t, "messages 2 and 3 on b", func() bool { return len(b.accepted()) == 3 && tr.queue.len() == 0 })
	if n := requests(); n != 1 {
		t.Errorf("a got %d requests while paused, want none after the first", n)
	}
	if v := value(throttled); v != 2 {
		t.Errorf("relaycar_upstream_skipped_total{upstream=a,reason=throttled} = %v, want 2", v)
	}
	if s := gate.State(); s != gobreaker.StateClosed {
		t.Errorf("a's breaker is %s after a throttle; want closed (failures: 1)", s)
	}

	clock.advance(pause + time.Second)
	send(4)
	waitFor(t, "message 4 on a after the pause", func() bool { return requests() == 2 && tr.queue.len() == 0 })
	if n := len(b.accepted()); n != 3 {
		t.Errorf("b has %d messages, want 3 (message 4 belongs to a again)", n)
	}
	if v := value(throttled); v != 2 {
		t.Errorf("skipped{reason=throttled} = %v after the pause, want still 2", v)
	}
	if s := gate.State(); s != gobreaker.StateClosed {
		t.Errorf("a's breaker is %s; want closed", s)
	}
	if envs, _ := tr.spool.List(); len(envs) != 0 {
		t.Errorf("%d messages left in the spool", len(envs))
	}
}

// SMTP2GO's API answers a burst with 429 Retry-After: 2.
func TestDelivery_HTTP429PausesUpstreamWithoutTrippingBreaker(t *testing.T) {
	t.Parallel()
	f := fakes.NewHTTP(t, func(n int, _ fakes.Request) fakes.Reply {
		if n == 0 {
			r := fakes.JSON(429, `{"request_id":"r0","data":{"error":"Too many requests"}}`)
			r.Header["Retry-After"] = "2"
			return r
		}
		return fakes.JSON(200, `{"request_id":"r`+strconv.Itoa(n)+`","data":{"succeeded":1,"failed":0,"failures":[],"email_id":"a-`+strconv.Itoa(n)+`"}}`)
	})
	a := upstreams.Config{Name: "a", Type: "smtp2go", APIKey: "api-throttle-test", Endpoint: f.URL}
	throttleScenario(t, a, func() int { return len(f.Requests()) }, 2*time.Second)
}

// Gmail's smarthost refuses a sender going too fast with 421 4.7.28.
func TestDelivery_SMTPRateReplyPausesUpstreamWithoutTrippingBreaker(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	var mails atomic.Int32 // MAIL commands, refused or not
	sink.SetScript(testsmtp.Script{Mail: func(string) error {
		if mails.Add(1) == 1 {
			return testsmtp.Reply(421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address.")
		}
		return nil
	}})
	requests := func() int { return int(mails.Load()) }
	a := upstreams.Config{Name: "a", Type: "smtp", Address: sink.Addr, TLS: "none"}
	// smtpRatePause: a rate reply asks for a minute.
	throttleScenario(t, a, requests, time.Minute)
}

// A reload that rebuilds an upstream (a rotated key, a new timeout) gives
// it a new gate; a throttle pause, such as SES's 1 h "Daily message quota
// exceeded", must hold on it: the pause seen before the reload, one that
// an attempt still running on the old gate sees after it, and one whose
// upstream a reload moves off rate_limit.shared.
func TestReload_RebuiltUpstreamKeepsItsThrottlePause(t *testing.T) {
	t.Parallel()
	quota := func(name string) error {
		return &upstreams.Error{Upstream: name, Class: upstreams.Transient, Reason: "Daily message quota exceeded", RetryAt: time.Now().Add(time.Hour)}
	}
	m := &upstreams.Message{ID: "x", From: "s@example.com", To: []string{"r@example.net"}}
	admit := func(g *policy.Gate) policy.Skip { return g.Admit(context.Background(), policy.Ask{Size: 10, Rcpts: 1}) }
	// rebuild reloads with a longer timeout for every upstream and returns
	// the engine before it.
	rebuild := func(t *testing.T, tr *testRelay, edit func(*Config)) *engine {
		t.Helper()
		old := tr.engine.Load()
		cfg := *old.cfg
		cfg.Upstreams = slices.Clone(cfg.Upstreams)
		for i := range cfg.Upstreams {
			cfg.Upstreams[i].Timeout += time.Second
		}
		if edit != nil {
			edit(&cfg)
		}
		if err := tr.Reload(&cfg); err != nil {
			t.Fatal(err)
		}
		for name, g := range tr.engine.Load().gates {
			if old.gates[name] == g {
				t.Fatalf("the reload kept %s's gate; the test needs a rebuilt one", name)
			}
		}
		return old
	}

	t.Run("paused before the reload", func(t *testing.T) {
		t.Parallel()
		a := &recorder{name: "a", errs: []error{quota("a")}}
		tr := startRelayDeps(t, []*recorder{a}, nil, nil, false, nil, nil)
		if _, err := tr.engine.Load().gates["a"].Send(context.Background(), m); err == nil {
			t.Fatal("want the throttle")
		}
		rebuild(t, tr, nil)
		if s := admit(tr.engine.Load().gates["a"]); s != policy.SkipThrottled {
			t.Errorf("after the reload: %v, want throttled (paused for 1h)", s)
		}
	})
	t.Run("paused by an attempt on the old gate", func(t *testing.T) {
		t.Parallel()
		a := &recorder{name: "a", errs: []error{quota("a")}}
		tr := startRelayDeps(t, []*recorder{a}, nil, nil, false, nil, nil)
		old := rebuild(t, tr, nil)
		if _, err := old.gates["a"].Send(context.Background(), m); err == nil {
			t.Fatal("want the throttle")
		}
		if s := admit(tr.engine.Load().gates["a"]); s != policy.SkipThrottled {
			t.Errorf("the new gate after the old one was throttled: %v, want throttled", s)
		}
	})
	t.Run("shared turned off", func(t *testing.T) {
		t.Parallel()
		redis := miniredis.RunT(t)
		a := &recorder{name: "a", errs: []error{quota("a")}}
		tr := startRelayDeps(t, []*recorder{a}, nil, func(c *Config) {
			c.Redis.Address = redis.Addr()
			c.Upstreams[0].RateLimit = upstreams.RateLimit{PerSecond: 100, Burst: 10, MaxWait: time.Second, Shared: true}
		}, false, nil, nil)
		if _, err := tr.engine.Load().gates["a"].Send(context.Background(), m); err == nil {
			t.Fatal("want the throttle")
		}
		rebuild(t, tr, func(c *Config) { c.Upstreams[0].RateLimit.Shared = false })
		if s := admit(tr.engine.Load().gates["a"]); s != policy.SkipThrottled {
			t.Errorf("after a reload to a local limit: %v, want throttled (paused for 1h)", s)
		}
	})
}
