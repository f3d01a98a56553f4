package policy

import (
	"context"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// localLimiter is rate_limit as a token bucket in this process.
type localLimiter struct{ l *rate.Limiter }

// NewLocalLimiter is a token bucket of perSecond with burst (at least 1).
func NewLocalLimiter(perSecond float64, burst int) Limiter {
	return localLimiter{rate.NewLimiter(rate.Limit(perSecond), max(1, burst))}
}

// Take waits for n tokens. A message with more recipients than the burst
// costs the whole burst: it could never be admitted otherwise.
func (l localLimiter) Take(ctx context.Context, n int) bool {
	// WaitN fails at once, without taking tokens, when they would come
	// after ctx's deadline.
	return l.l.WaitN(ctx, min(n, l.l.Burst())) == nil
}

func (l localLimiter) SetRate(perSecond float64) { l.l.SetLimit(rate.Limit(perSecond)) }

// NewLocalPauses keeps throttle pauses in this process, by upstream name:
// one record that outlives the gates (a reload rebuilds an upstream's gate,
// and a 1 h daily-quota pause must not end with it).
func NewLocalPauses() Pauses { return &localPauses{} }

// localPauses keeps throttle pauses in this process.
type localPauses struct {
	mu    sync.Mutex
	until map[string]time.Time
}

func (p *localPauses) Pause(upstream string, until time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.until == nil {
		p.until = map[string]time.Time{}
	}
	if until.After(p.until[upstream]) {
		p.until[upstream] = until
	}
}

func (p *localPauses) PausedUntil(upstream string) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.until[upstream]
}
