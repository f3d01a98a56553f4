package policy

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/upstreams"
)

// Skip says why an upstream was not tried for a message.
type Skip int

const (
	// NotSkipped: go ahead and Send.
	NotSkipped Skip = iota
	// SkipBreakerOpen: the upstream's breaker is open (or half-open and busy).
	SkipBreakerOpen
	// SkipSenderOpen: the (upstream, sender domain) breaker is open.
	SkipSenderOpen
	// SkipRateLimited: no token within max_wait.
	SkipRateLimited
	// SkipTooBig: the message exceeds the upstream's max_message_bytes.
	SkipTooBig
	// SkipThrottled: the upstream asked us to wait (429 Retry-After, SES
	// throttling, SMTP 421 4.7.x) and that time has not come.
	SkipThrottled
	// SkipQuotaExhausted: the provider's own quota (SES Max24HourSend) is
	// used up.
	SkipQuotaExhausted
)

// Skips lists every reason an upstream can be skipped, for metrics.
func Skips() []Skip {
	return []Skip{SkipBreakerOpen, SkipSenderOpen, SkipRateLimited, SkipTooBig, SkipThrottled, SkipQuotaExhausted}
}

func (s Skip) String() string {
	switch s {
	case NotSkipped:
		return "none"
	case SkipBreakerOpen:
		return "breaker_open"
	case SkipSenderOpen:
		return "sender_breaker_open"
	case SkipRateLimited:
		return "rate_limited"
	case SkipTooBig:
		return "too_big"
	case SkipThrottled:
		return "throttled"
	case SkipQuotaExhausted:
		return "quota_exhausted"
	}
	return "unknown"
}

// Gate guards one upstream with its circuit breakers, rate limit and size
// limit.
type Gate struct {
	up      upstreams.Upstream
	cb      *gobreaker.CircuitBreaker[string]
	tripNow atomic.Bool
	// limiter is nil without rate_limit.per_second.
	limiter Limiter
	pauses  Pauses
	now     func() time.Time
	// exhausted is set while the provider's quota is used up.
	exhausted atomic.Bool
	maxWait   time.Duration
	maxBytes  int64
	settings  gobreaker.Settings
	hooks     GateHooks

	mu      sync.Mutex
	senders map[string]*gobreaker.CircuitBreaker[string]
	// rewrittenFrom is the domain of the upstream's rewrite_from: the
	// sender domain of every message it sends ("" without one).
	rewrittenFrom string
}

// GateHooks lets the caller observe breaker transitions (logs, metrics)
// without policy depending on them, and replace the local rate limit and
// throttle pauses with shared ones.
type GateHooks struct {
	// OnStateChange is called for the upstream breaker; sender is "" for it
	// and the sender domain for a per-sender breaker.
	OnStateChange func(upstream, sender string, from, to gobreaker.State)
	// Limiter replaces the local token bucket of rate_limit (a limit
	// shared by replicas); nil is the local one.
	Limiter Limiter
	// Pauses replaces the process-local record of throttle pauses.
	Pauses Pauses
	// Now is the clock for pauses; nil is time.Now.
	Now func() time.Time
}

// Limiter hands out rate-limit tokens, one per envelope recipient, as
// providers count them (SES's MaxSendRate is recipients per second).
type Limiter interface {
	// Take takes n tokens if they come before ctx ends; it takes none and
	// returns false otherwise.
	Take(ctx context.Context, n int) bool
	// SetRate changes the rate (the provider's quota moved); burst stays.
	SetRate(perSecond float64)
}

// Pauses records until when an upstream asked not to be called.
type Pauses interface {
	Pause(upstream string, until time.Time)
	PausedUntil(upstream string) time.Time
}

// NewGate wraps u with the limits of its config entry (defaults applied).
func NewGate(u upstreams.Upstream, c upstreams.Config, h GateHooks) *Gate {
	g := &Gate{up: u, hooks: h, maxWait: c.RateLimit.MaxWait, maxBytes: c.MaxMessageBytes, senders: map[string]*gobreaker.CircuitBreaker[string]{},
		limiter: h.Limiter, pauses: h.Pauses, now: h.Now}
	if at := strings.LastIndexByte(c.RewriteFrom, '@'); at >= 0 {
		// Every message leaves as rewrite_from: a refusal of that sender
		// is one for all of them, whatever their own sender was.
		g.rewrittenFrom = strings.ToLower(c.RewriteFrom[at+1:])
	}
	if g.limiter == nil && c.RateLimit.PerSecond > 0 {
		g.limiter = NewLocalLimiter(c.RateLimit.PerSecond, c.RateLimit.Burst)
	}
	if g.pauses == nil {
		g.pauses = &localPauses{}
	}
	if g.now == nil {
		g.now = time.Now
	}
	failures := max(1, c.CircuitBreaker.Failures)
	notify := func(sender string) func(string, gobreaker.State, gobreaker.State) {
		return func(_ string, from, to gobreaker.State) {
			if h.OnStateChange != nil {
				h.OnStateChange(u.Name(), sender, from, to)
			}
		}
	}
	g.settings = gobreaker.Settings{
		Name:    u.Name(),
		Timeout: c.CircuitBreaker.OpenFor,
		ReadyToTrip: func(n gobreaker.Counts) bool {
			// A provider fault (revoked key, suspended account) will not
			// heal by retrying: trip on the first one.
			return g.tripNow.Swap(false) || n.ConsecutiveFailures >= failures
		},
		IsSuccessful: func(err error) bool {
			if err == nil {
				return true
			}
			// A bad message, an unverified sender or content this provider
			// cannot carry is not a sick provider.
			switch upstreams.ClassOf(err) {
			case upstreams.Rejected, upstreams.SenderRejected, upstreams.Unsupported:
				return true
			}
			return false
		},
		// A throttle says nothing of the provider's health either way: as
		// a success it would reset the failure count and close a
		// half-open breaker on a provider that answered only "slow down".
		IsExcluded: func(err error) bool { return isShutdown(err) || !upstreams.RetryAtOf(err).IsZero() },
		OnStateChange: func(name string, from, to gobreaker.State) {
			// A provider fault seen while half-open (or from an older
			// generation) never reached ReadyToTrip; do not let it trip
			// the next closed period on a single transient error.
			g.tripNow.Store(false)
			notify("")(name, from, to)
		},
	}
	g.cb = gobreaker.NewCircuitBreaker[string](g.settings)
	return g
}

// isShutdown keeps our own cancellation (SIGTERM drain) from counting as an
// upstream failure.
func isShutdown(err error) bool { return errors.Is(err, context.Canceled) }

// Name is the upstream's name.
func (g *Gate) Name() string { return g.up.Name() }

// State is the upstream breaker's state.
func (g *Gate) State() gobreaker.State { return g.cb.State() }

// MaxMessageBytes is the upstream's size limit, 0 for none.
func (g *Gate) MaxMessageBytes() int64 { return g.maxBytes }

// Ask describes the message an upstream is asked to take.
type Ask struct {
	Size         int64
	SenderDomain string
	// Rcpts is the number of envelope recipients: the message's cost in
	// rate-limit tokens (at least one).
	Rcpts int
}

// Admit says whether the upstream may be tried now for the message. It
// takes the rate-limit tokens when it says yes, so call Send right after.
func (g *Gate) Admit(ctx context.Context, a Ask) Skip {
	if g.maxBytes > 0 && a.Size > g.maxBytes {
		return SkipTooBig
	}
	if g.cb.State() == gobreaker.StateOpen {
		return SkipBreakerOpen
	}
	if sb := g.sender(a.SenderDomain, false); sb != nil && sb.State() == gobreaker.StateOpen {
		return SkipSenderOpen
	}
	if g.exhausted.Load() {
		return SkipQuotaExhausted
	}
	if g.now().Before(g.pauses.PausedUntil(g.up.Name())) {
		return SkipThrottled
	}
	if g.limiter != nil {
		wctx, cancel := context.WithTimeout(ctx, g.maxWait)
		defer cancel()
		if !g.limiter.Take(wctx, max(1, a.Rcpts)) {
			return SkipRateLimited
		}
	}
	return NotSkipped
}

// SetQuotaExhausted marks the provider's quota used up (or available
// again); while it is, Admit skips the upstream.
func (g *Gate) SetQuotaExhausted(v bool) { g.exhausted.Store(v) }

// SetRate changes the rate limit, e.g. to the provider's own maximum; it
// does nothing without a rate_limit.
func (g *Gate) SetRate(perSecond float64) {
	if g.limiter != nil {
		g.limiter.SetRate(perSecond)
	}
}

// PausedUntil is when the upstream may be called again after a throttle
// (zero or past: now).
func (g *Gate) PausedUntil() time.Time { return g.pauses.PausedUntil(g.up.Name()) }

// ErrBreakerOpen is returned by Send when a breaker refused the call (it
// opened, or half-open already has its probe in flight, since Admit).
var ErrBreakerOpen = errors.New("circuit breaker open")

// Send runs the upstream through the sender breaker (if this sender was ever
// refused here) and the upstream breaker. The breakers judge a partial
// delivery by its worst refusal, as they would a Send failing with it.
func (g *Gate) Send(ctx context.Context, m *upstreams.Message) (upstreams.Receipt, error) {
	var (
		rc  upstreams.Receipt
		err error // the upstream's own answer; the breakers see verdict
	)
	send := func() (string, error) {
		rc, err = g.up.Send(ctx, m)
		v := verdict(rc, err)
		// Later messages skip this upstream without a request until t; a
		// partial delivery whose later request was throttled (a second
		// chunk of recipients) pauses it too.
		if t := upstreams.RetryAtOf(v); t.After(g.now()) {
			g.pauses.Pause(g.up.Name(), t)
		}
		if v != nil && upstreams.ClassOf(v) == upstreams.ProviderFault {
			g.tripNow.Store(true)
		}
		return "", v
	}
	call := func() (string, error) { return g.cb.Execute(send) }
	var v error
	if sb := g.sender(m.SenderDomain(), false); sb != nil {
		_, v = sb.Execute(call)
	} else {
		_, v = call()
	}
	if errors.Is(v, gobreaker.ErrOpenState) || errors.Is(v, gobreaker.ErrTooManyRequests) {
		return upstreams.Receipt{}, ErrBreakerOpen
	}
	if v != nil && upstreams.ClassOf(v) == upstreams.SenderRejected {
		if sb := g.sender(m.SenderDomain(), true); sb.State() == gobreaker.StateClosed {
			// First refusal of this sender: record it so the breaker opens.
			sb.Execute(func() (string, error) { return "", v })
		}
	}
	return rc, err
}

// verdict is what the breakers count for one Send: its error, or for a
// partial delivery its worst refusal.
func verdict(rc upstreams.Receipt, err error) error {
	if err == nil {
		if w := rc.Worst(); w != nil {
			return w
		}
	}
	return err
}

// sender returns the breaker for (this upstream, domain), creating it when
// create is set. Breakers exist only for senders that were refused, so the
// map stays as small as the set of misconfigured sender domains.
func (g *Gate) sender(domain string, create bool) *gobreaker.CircuitBreaker[string] {
	if g.rewrittenFrom != "" {
		domain = g.rewrittenFrom
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	sb := g.senders[domain]
	if sb == nil && create {
		st := g.settings
		st.Name = g.up.Name() + "/" + domain
		st.ReadyToTrip = func(n gobreaker.Counts) bool { return n.ConsecutiveFailures >= 1 }
		st.IsSuccessful = func(err error) bool { return upstreams.ClassOf(err) != upstreams.SenderRejected }
		st.OnStateChange = func(_ string, from, to gobreaker.State) {
			if g.hooks.OnStateChange != nil {
				g.hooks.OnStateChange(g.up.Name(), domain, from, to)
			}
		}
		sb = gobreaker.NewCircuitBreaker[string](st)
		g.senders[domain] = sb
	}
	return sb
}
