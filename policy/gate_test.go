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
		if skip := g.Admit(context.Background(), 1, "x"); skip != NotSkipped {
			t.Fatalf("attempt %d skipped: %v", i, skip)
		}
		g.Send(context.Background(), msg)
	}
	if g.State() != gobreaker.StateOpen {
		t.Fatalf("state = %v after 3 failures, want open", g.State())
	}
	if skip := g.Admit(context.Background(), 1, "x"); skip != SkipBreakerOpen {
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
	if skip := g.Admit(context.Background(), 1, "news.example.com"); skip != SkipSenderOpen {
		t.Errorf("Admit(refused sender) = %v, want sender_breaker_open", skip)
	}
	if skip := g.Admit(context.Background(), 1, "example.org"); skip != NotSkipped {
		t.Errorf("Admit(other sender) = %v, want none", skip)
	}
	if len(*changes) != 1 || (*changes)[0] != "up/news.example.com:open" {
		t.Errorf("changes = %v", *changes)
	}
	time.Sleep(150 * time.Millisecond)
	if skip := g.Admit(context.Background(), 1, "news.example.com"); skip != NotSkipped {
		t.Errorf("after open_for: Admit = %v, want none (half-open probe)", skip)
	}
	if _, err := g.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if skip := g.Admit(context.Background(), 1, "news.example.com"); skip != NotSkipped {
		t.Errorf("after a successful probe: Admit = %v", skip)
	}
}

func TestGate_RateLimitAndSize(t *testing.T) {
	t.Parallel()
	u := &scripted{}
	g, _ := newTestGate(u, 5, time.Hour, upstreams.RateLimit{PerSecond: 1, Burst: 2, MaxWait: 10 * time.Millisecond})
	g.maxBytes = 100
	if skip := g.Admit(context.Background(), 101, ""); skip != SkipTooBig {
		t.Errorf("Admit(101 bytes) = %v, want too_big", skip)
	}
	for i := range 2 {
		if skip := g.Admit(context.Background(), 10, ""); skip != NotSkipped {
			t.Fatalf("burst token %d: %v", i, skip)
		}
	}
	start := time.Now()
	if skip := g.Admit(context.Background(), 10, ""); skip != SkipRateLimited {
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
