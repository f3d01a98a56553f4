package policy

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/upstreams"
)

// scripted returns the errors in order, then nil forever.
type scripted struct {
	mu    sync.Mutex
	errs  []error
	calls int
}

func (s *scripted) Name() string { return "up" }
func (s *scripted) Send(context.Context, *upstreams.Message) (upstreams.Receipt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	if len(s.errs) == 0 {
		return upstreams.Receipt{ProviderID: "id"}, nil
	}
	err := s.errs[0]
	s.errs = s.errs[1:]
	return upstreams.Receipt{}, err
}

func classErr(c upstreams.Class) error {
	return &upstreams.Error{Upstream: "up", Class: c, Reason: c.String()}
}

func newTestGate(u upstreams.Upstream, failures uint32, openFor time.Duration, rl upstreams.RateLimit) (*Gate, *[]string) {
	c := upstreams.Config{Name: "up", CircuitBreaker: upstreams.CircuitBreaker{Failures: failures, OpenFor: openFor}, RateLimit: rl}
	c.ApplyDefaults()
	var mu sync.Mutex
	var changes []string
	g := NewGate(u, c, GateHooks{OnStateChange: func(up, sender string, from, to gobreaker.State) {
		mu.Lock()
		changes = append(changes, up+"/"+sender+":"+to.String())
		mu.Unlock()
	}})
	return g, &changes
}

var msg = &upstreams.Message{ID: "m", From: "a@news.example.com", To: []string{"x@example.net"}, Body: upstreams.BytesBody([]byte("x"))}

func TestGate_TransientOpensAfterFailures(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{classErr(upstreams.Transient), classErr(upstreams.Ambiguous), classErr(upstreams.Transient)}}
	g, _ := newTestGate(u, 3, time.Hour, upstreams.RateLimit{})
	for i := range 3 {
		if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "x"}); skip != NotSkipped {
			t.Fatalf("attempt %d skipped: %v", i, skip)
		}
		g.Send(context.Background(), msg)
	}
	if g.State() != gobreaker.StateOpen {
		t.Fatalf("state = %v after 3 failures, want open", g.State())
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "x"}); skip != SkipBreakerOpen {
		t.Errorf("Admit = %v, want breaker_open", skip)
	}
	if _, err := g.Send(context.Background(), msg); !errors.Is(err, ErrBreakerOpen) {
		t.Errorf("Send on open breaker = %v, want ErrBreakerOpen", err)
	}
	if u.calls != 3 {
		t.Errorf("upstream called %d times, want 3", u.calls)
	}
}

// Models a provider revoking the API key: one 401 is enough to stop sending.
func TestGate_ProviderFaultOpensAtOnce(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{classErr(upstreams.ProviderFault)}}
	g, changes := newTestGate(u, 5, 100*time.Millisecond, upstreams.RateLimit{})
	g.Send(context.Background(), msg)
	if g.State() != gobreaker.StateOpen {
		t.Fatalf("state = %v after one provider fault, want open", g.State())
	}
	// After open_for it half-opens; a success closes it.
	time.Sleep(150 * time.Millisecond)
	if g.State() != gobreaker.StateHalfOpen {
		t.Fatalf("state = %v after open_for, want half-open", g.State())
	}
	if _, err := g.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if g.State() != gobreaker.StateClosed {
		t.Fatalf("state = %v after a success in half-open, want closed", g.State())
	}
	want := []string{"up/:open", "up/:half-open", "up/:closed"}
	if len(*changes) != 3 || (*changes)[0] != want[0] || (*changes)[2] != want[2] {
		t.Errorf("state changes = %v, want %v", *changes, want)
	}
}

// A batch of messages with bad addresses must not take a healthy provider out.
func TestGate_RejectedDoesNotCount(t *testing.T) {
	t.Parallel()
	var errs []error
	for range 10 {
		errs = append(errs, classErr(upstreams.Rejected), classErr(upstreams.Unsupported))
	}
	u := &scripted{errs: errs}
	g, _ := newTestGate(u, 2, time.Hour, upstreams.RateLimit{})
	for range 20 {
		g.Send(context.Background(), msg)
	}
	if g.State() != gobreaker.StateClosed {
		t.Errorf("state = %v after rejected messages, want closed", g.State())
	}
}

// A partial delivery counts for the breaker as its refusals would: rejected
// recipients leave the upstream healthy, transient ones count against it.
// Either way the caller gets the receipt and no error.
func TestGate_PartialDeliveryJudgedByRefusals(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		class upstreams.Class
		want  gobreaker.State
	}{
		{upstreams.Rejected, gobreaker.StateClosed},
		{upstreams.Transient, gobreaker.StateOpen},
	} {
		u := upstreams.Func{N: "up", F: func(context.Context, *upstreams.Message) (upstreams.Receipt, error) {
			return upstreams.Receipt{ProviderID: "p", Refused: []upstreams.Refusal{{Rcpt: "x@example.net", Err: &upstreams.Error{Upstream: "up", Class: tc.class}}}}, nil
		}}
		g, _ := newTestGate(u, 2, time.Hour, upstreams.RateLimit{})
		for range 2 {
			if rc, err := g.Send(context.Background(), msg); err != nil || rc.ProviderID != "p" || len(rc.Refused) != 1 {
				t.Fatalf("%v: Send = %+v, %v; want the receipt and no error", tc.class, rc, err)
			}
		}
		if g.State() != tc.want {
			t.Errorf("%v refusals: state = %v, want %v", tc.class, g.State(), tc.want)
		}
	}
}

func TestGate_ShutdownDoesNotCount(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{context.Canceled, context.Canceled, context.Canceled}}
	g, _ := newTestGate(u, 1, time.Hour, upstreams.RateLimit{})
	for range 3 {
		g.Send(context.Background(), msg)
	}
	if g.State() != gobreaker.StateClosed {
		t.Errorf("state = %v after cancellations, want closed", g.State())
	}
}

// Models SendGrid refusing an unverified sender identity: only that sender
// domain stops going there.
func TestGate_SenderRejectedOpensOnlyThatSender(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{classErr(upstreams.SenderRejected)}}
	g, changes := newTestGate(u, 1, 100*time.Millisecond, upstreams.RateLimit{})
	g.Send(context.Background(), msg)
	if g.State() != gobreaker.StateClosed {
		t.Errorf("upstream breaker = %v, want closed", g.State())
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "news.example.com"}); skip != SkipSenderOpen {
		t.Errorf("Admit(refused sender) = %v, want sender_breaker_open", skip)
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "example.org"}); skip != NotSkipped {
		t.Errorf("Admit(other sender) = %v, want none", skip)
	}
	if len(*changes) != 1 || (*changes)[0] != "up/news.example.com:open" {
		t.Errorf("changes = %v", *changes)
	}
	time.Sleep(150 * time.Millisecond)
	if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "news.example.com"}); skip != NotSkipped {
		t.Errorf("after open_for: Admit = %v, want none (half-open probe)", skip)
	}
	if _, err := g.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: "news.example.com"}); skip != NotSkipped {
		t.Errorf("after a successful probe: Admit = %v", skip)
	}
}

func TestGate_RateLimitAndSize(t *testing.T) {
	t.Parallel()
	u := &scripted{}
	g, _ := newTestGate(u, 5, time.Hour, upstreams.RateLimit{PerSecond: 1, Burst: 2, MaxWait: 10 * time.Millisecond})
	g.maxBytes = 100
	if skip := g.Admit(context.Background(), Ask{Size: 101, SenderDomain: ""}); skip != SkipTooBig {
		t.Errorf("Admit(101 bytes) = %v, want too_big", skip)
	}
	for i := range 2 {
		if skip := g.Admit(context.Background(), Ask{Size: 10, SenderDomain: ""}); skip != NotSkipped {
			t.Fatalf("burst token %d: %v", i, skip)
		}
	}
	start := time.Now()
	if skip := g.Admit(context.Background(), Ask{Size: 10, SenderDomain: ""}); skip != SkipRateLimited {
		t.Errorf("third Admit = %v, want rate_limited", skip)
	}
	if time.Since(start) > 500*time.Millisecond {
		t.Errorf("rate-limited Admit waited %v; it must give up at once when the token is beyond max_wait", time.Since(start))
	}
}

// A provider fault seen while half-open must not linger and trip the
// breaker on the first transient error after it closes again.
func TestGate_ProviderFaultInHalfOpenDoesNotLinger(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{classErr(upstreams.ProviderFault), classErr(upstreams.ProviderFault), nil, classErr(upstreams.Transient)}}
	g, _ := newTestGate(u, 3, 50*time.Millisecond, upstreams.RateLimit{})
	g.Send(context.Background(), msg) // open
	time.Sleep(70 * time.Millisecond)
	g.Send(context.Background(), msg) // half-open probe fails: open again
	if g.State() != gobreaker.StateOpen {
		t.Fatalf("state = %v", g.State())
	}
	time.Sleep(70 * time.Millisecond)
	g.Send(context.Background(), msg) // probe succeeds: closed
	g.Send(context.Background(), msg) // one transient failure
	if g.State() != gobreaker.StateClosed {
		t.Errorf("state = %v after one transient failure with failures: 3, want closed", g.State())
	}
}

// A throttle (an error with RetryAt) pauses the upstream until then without
// counting against the breaker: later messages skip it with throttled and
// no request, and it is tried again once the time has come.
func TestGate_ThrottlePausesWithoutTrippingBreaker(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_800_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	throttle := &upstreams.Error{Upstream: "up", Class: upstreams.Transient, Reason: "429", RetryAt: now.Add(30 * time.Second)}
	u := &scripted{errs: []error{throttle}}
	c := upstreams.Config{Name: "up", CircuitBreaker: upstreams.CircuitBreaker{Failures: 1, OpenFor: time.Hour}}
	c.ApplyDefaults()
	g := NewGate(u, c, GateHooks{Now: clock})
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != NotSkipped {
		t.Fatal(skip)
	}
	if _, err := g.Send(context.Background(), msg); upstreams.RetryAtOf(err) != throttle.RetryAt {
		t.Fatalf("Send = %v, want the throttle", err)
	}
	if g.State() != gobreaker.StateClosed {
		t.Errorf("breaker %v after a throttle with failures: 1, want closed", g.State())
	}
	for range 3 {
		if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != SkipThrottled {
			t.Fatalf("Admit while paused = %v, want throttled", skip)
		}
	}
	mu.Lock()
	now = now.Add(31 * time.Second)
	mu.Unlock()
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != NotSkipped {
		t.Fatalf("Admit after the pause = %v", skip)
	}
	if _, err := g.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if u.calls != 2 {
		t.Errorf("%d calls to the upstream, want 2 (none while paused)", u.calls)
	}
}

// A later chunk of recipients throttled after the first was delivered
// (SES, SendGrid and Mailgun split large envelopes): the partial delivery's
// refusal pauses the upstream as a failed Send would.
func TestGate_ThrottledRefusalPauses(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_800_000_000, 0)
	throttle := &upstreams.Error{Upstream: "up", Class: upstreams.Transient, Reason: "429", RetryAt: now.Add(30 * time.Second)}
	u := upstreams.Func{N: "up", F: func(context.Context, *upstreams.Message) (upstreams.Receipt, error) {
		return upstreams.Receipt{ProviderID: "p", Refused: []upstreams.Refusal{{Rcpt: "x@example.net", Err: throttle}}}, nil
	}}
	c := upstreams.Config{Name: "up", CircuitBreaker: upstreams.CircuitBreaker{Failures: 1, OpenFor: time.Hour}}
	c.ApplyDefaults()
	g := NewGate(u, c, GateHooks{Now: func() time.Time { return now }})
	if rc, err := g.Send(context.Background(), msg); err != nil || len(rc.Refused) != 1 {
		t.Fatalf("Send = %+v, %v; want the partial receipt", rc, err)
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != SkipThrottled {
		t.Errorf("Admit after a throttled refusal = %v, want throttled", skip)
	}
	if g.State() != gobreaker.StateClosed {
		t.Errorf("breaker %v, want closed", g.State())
	}
}

// A message costs one token per recipient; more recipients than the burst
// cost the whole burst rather than never passing.
func TestGate_RateLimitCostsOneTokenPerRecipient(t *testing.T) {
	t.Parallel()
	g, _ := newTestGate(&scripted{}, 5, time.Hour, upstreams.RateLimit{PerSecond: 0.001, Burst: 10, MaxWait: 10 * time.Millisecond})
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 7}); skip != NotSkipped {
		t.Fatalf("7 of 10: %v", skip)
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 4}); skip != SkipRateLimited {
		t.Fatalf("4 more with 3 left: %v, want rate_limited", skip)
	}
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 3}); skip != NotSkipped {
		t.Fatalf("the last 3: %v", skip)
	}
	g2, _ := newTestGate(&scripted{}, 5, time.Hour, upstreams.RateLimit{PerSecond: 0.001, Burst: 10, MaxWait: 10 * time.Millisecond})
	if skip := g2.Admit(context.Background(), Ask{Size: 1, Rcpts: 50}); skip != NotSkipped {
		t.Fatalf("50 recipients with burst 10: %v, want admitted for the whole burst", skip)
	}
	if skip := g2.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != SkipRateLimited {
		t.Fatalf("after the whole burst: %v", skip)
	}
}

// A used-up provider quota skips the upstream until it is available again.
func TestGate_QuotaExhausted(t *testing.T) {
	t.Parallel()
	g, _ := newTestGate(&scripted{}, 5, time.Hour, upstreams.RateLimit{})
	g.SetQuotaExhausted(true)
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != SkipQuotaExhausted {
		t.Fatalf("Admit = %v, want quota_exhausted", skip)
	}
	g.SetQuotaExhausted(false)
	if skip := g.Admit(context.Background(), Ask{Size: 1, Rcpts: 1}); skip != NotSkipped {
		t.Fatalf("Admit = %v after the quota came back", skip)
	}
}

// A throttle is neither a failure nor a success for the breaker: it does
// not reset the count of consecutive failures, and a throttled half-open
// probe leaves the breaker half-open instead of closing it.
func TestGate_ThrottleIsNeitherFailureNorSuccess(t *testing.T) {
	t.Parallel()
	throttle := func() error {
		return &upstreams.Error{Upstream: "up", Class: upstreams.Transient, Reason: "429", RetryAt: time.Now().Add(time.Millisecond)}
	}
	t.Run("closed", func(t *testing.T) {
		t.Parallel()
		u := &scripted{errs: []error{classErr(upstreams.Transient), throttle(), classErr(upstreams.Transient)}}
		g, _ := newTestGate(u, 2, time.Hour, upstreams.RateLimit{})
		for range 3 {
			g.Send(context.Background(), msg)
		}
		if g.State() != gobreaker.StateOpen {
			t.Errorf("state = %v after transient, throttle, transient with failures: 2, want open", g.State())
		}
	})
	t.Run("half-open", func(t *testing.T) {
		t.Parallel()
		u := &scripted{errs: []error{classErr(upstreams.ProviderFault), throttle(), classErr(upstreams.Transient)}}
		g, _ := newTestGate(u, 5, 50*time.Millisecond, upstreams.RateLimit{})
		g.Send(context.Background(), msg) // open
		time.Sleep(70 * time.Millisecond)
		g.Send(context.Background(), msg) // the half-open probe is throttled
		if g.State() != gobreaker.StateHalfOpen {
			t.Fatalf("state = %v after a throttled half-open probe, want half-open", g.State())
		}
		g.Send(context.Background(), msg) // the next probe fails
		if g.State() != gobreaker.StateOpen {
			t.Errorf("state = %v after a failed half-open probe, want open", g.State())
		}
	})
}

// With rewrite_from every message leaves with that sender: its refusal
// opens one breaker that every message meets, whatever its own sender,
// instead of one per original domain, each paying a failed attempt.
func TestGate_SenderBreakerFollowsRewriteFrom(t *testing.T) {
	t.Parallel()
	u := &scripted{errs: []error{classErr(upstreams.SenderRejected)}}
	c := upstreams.Config{Name: "up", RewriteFrom: "relay@Contoso.example", CircuitBreaker: upstreams.CircuitBreaker{Failures: 1, OpenFor: time.Hour}}
	c.ApplyDefaults()
	g := NewGate(u, c, GateHooks{})
	g.Send(context.Background(), msg) // from news.example.com, refused as relay@contoso.example
	for _, domain := range []string{"news.example.com", "example.org"} {
		if skip := g.Admit(context.Background(), Ask{Size: 1, SenderDomain: domain}); skip != SkipSenderOpen {
			t.Errorf("Admit(%s) = %v, want sender_breaker_open: it would be sent as relay@contoso.example", domain, skip)
		}
	}
	if g.State() != gobreaker.StateClosed {
		t.Errorf("upstream breaker = %v, want closed", g.State())
	}
}
