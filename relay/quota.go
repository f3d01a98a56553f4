package relay

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

const (
	// quotaEvery is how often a provider's quota is read again: SES's
	// 24-hour window moves and AWS raises limits without notice.
	quotaEvery = 5 * time.Minute
	// quotaFirstRead bounds the read at start, which holds back the first
	// deliveries (so they see the real limit) but must not hold them long.
	quotaFirstRead = 5 * time.Second
)

// quotaWatch keeps the gates of rate_limit.from_provider upstreams in line
// with the provider's own quota: the rate capped at MaxSendRate, the
// upstream skipped while the 24-hour quota is used up.
type quotaWatch struct {
	log     *slog.Logger
	metrics *quotaMetrics
	ups     []*quotaUpstream
	byName  map[string]*quotaUpstream
	// configured are the upstreams with from_provider at start, watched
	// or not (one without a quota is only warned about): what a reload
	// cannot change.
	configured map[string]bool
	// newTicker makes the re-read ticker; tests replace it to tick at will.
	newTicker func(time.Duration) (<-chan time.Time, func())
	current   func(name string) (up upstreams.Upstream, gate *policy.Gate, perSecond float64)
}

// quotaUpstream is one from_provider upstream and what is known of its
// quota.
type quotaUpstream struct {
	name      string
	gate      *policy.Gate // as of the last read
	perSecond float64

	mu    sync.Mutex
	known bool
	q     upstreams.Quota
	// sentSince counts recipients delivered here since q was read, so the
	// quota moves with our own sends between reads.
	sentSince float64
	exhausted bool
	disabled  bool
}

// current returns an upstream's adapter, gate and rate_limit.per_second in
// the running engine (nil after a reload removed it): a reload may change
// any of them.
func newQuotaWatch(cfgs []upstreams.Config, current func(name string) (upstreams.Upstream, *policy.Gate, float64), m *quotaMetrics, log *slog.Logger) *quotaWatch {
	w := &quotaWatch{log: log, metrics: m, byName: map[string]*quotaUpstream{}, configured: map[string]bool{}, current: current,
		newTicker: func(d time.Duration) (<-chan time.Time, func()) {
			t := time.NewTicker(d)
			return t.C, t.Stop
		}}
	for _, c := range cfgs {
		if !c.RateLimit.FromProvider {
			continue
		}
		w.configured[c.Name] = true
		up, gate, _ := current(c.Name)
		if _, ok := upstreams.Unwrap(up).(upstreams.QuotaReader); !ok {
			log.Warn("rate_limit.from_provider ignored: this upstream does not report a quota", "upstream", c.Name)
			continue
		}
		u := &quotaUpstream{name: c.Name, gate: gate, perSecond: c.RateLimit.PerSecond}
		w.ups = append(w.ups, u)
		w.byName[c.Name] = u
	}
	return w
}

// start reads every quota once (bounded by quotaFirstRead), then again
// every quotaEvery until ctx ends.
func (w *quotaWatch) start(ctx context.Context) {
	if w == nil || len(w.ups) == 0 {
		return
	}
	first, cancel := context.WithTimeout(ctx, quotaFirstRead)
	w.readAll(first)
	cancel()
	tick, stop := w.newTicker(quotaEvery)
	go func() {
		defer stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick:
				w.readAll(ctx)
			}
		}
	}()
}

func (w *quotaWatch) readAll(ctx context.Context) {
	var wg sync.WaitGroup
	for _, u := range w.ups {
		wg.Go(func() { w.read(ctx, u) })
	}
	wg.Wait()
}

// read asks the provider. A failed read is logged and changes nothing:
// the last known quota stays until the next tick.
func (w *quotaWatch) read(ctx context.Context, u *quotaUpstream) {
	up, gate, _ := w.current(u.name)
	qr, ok := upstreams.Unwrap(up).(upstreams.QuotaReader)
	if !ok || gate == nil {
		return // removed or changed by a reload
	}
	q, err := qr.Quota(ctx)
	if err != nil && ctx.Err() == context.Canceled {
		return // shutting down
	}
	if err != nil {
		if _, gate, _ := w.current(u.name); gate != nil {
			w.log.Warn("reading the provider quota failed; keeping the last known one", "upstream", u.name, "err", err)
		}
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	// A reload during the read may have replaced the gate: the quota goes
	// on the running one. Looked up under u.mu, as reloaded does after the
	// swap, so a reload between the lookup and the lock cannot be undone
	// by storing the old gate back.
	_, gate, perSecond := w.current(u.name)
	if gate == nil {
		return
	}
	first := !u.known
	u.q, u.sentSince, u.known, u.gate, u.perSecond = q, 0, true, gate, perSecond
	rate := u.capRateLocked()
	w.metrics.maxSendRate.WithLabelValues(u.name).Set(q.MaxSendRate)
	w.metrics.sandbox.WithLabelValues(u.name).Set(boolGauge(q.Sandbox))
	if first {
		w.log.Info("provider quota", "upstream", u.name, "max_send_rate", q.MaxSendRate, "rate", rate,
			"max_24h", q.Max24HourSend, "sent_24h", q.SentLast24Hours, "sandbox", q.Sandbox)
		if q.Sandbox {
			w.log.Warn("provider account is in the sandbox: mail reaches only verified recipients", "upstream", u.name)
		}
	}
	if !q.SendingEnabled && !u.disabled {
		w.log.Warn("provider says sending is disabled for this account", "upstream", u.name)
	}
	u.disabled = !q.SendingEnabled
	w.applyLocked(u)
}

// reloaded carries what is known of each quota over to the gates a reload
// built (a rebuilt upstream's new gate starts uncapped and not exhausted,
// which would last until the next read, up to quotaEvery). The set of
// watched upstreams is fixed at start: from_provider turned on or off by a
// reload is logged as needing a restart.
func (w *quotaWatch) reloaded(cfgs []upstreams.Config) {
	for _, c := range cfgs {
		if c.RateLimit.FromProvider != w.configured[c.Name] {
			w.log.Warn("config setting changed but needs a restart; not applied", "setting", "upstreams."+c.Name+".rate_limit.from_provider")
		}
	}
	for _, u := range w.ups {
		_, gate, perSecond := w.current(u.name)
		if gate == nil {
			continue // removed by the reload
		}
		u.mu.Lock()
		if gate != u.gate || perSecond != u.perSecond {
			u.gate, u.perSecond = gate, perSecond
			if u.known {
				u.capRateLocked()
				w.applyLocked(u)
			}
		}
		u.mu.Unlock()
	}
}

// sent counts n recipients delivered through upstream.
func (w *quotaWatch) sent(upstream string, n int) {
	if w == nil {
		return
	}
	u := w.byName[upstream]
	if u == nil {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.sentSince += float64(n)
	if u.known {
		w.applyLocked(u)
	}
}

// capRateLocked sets the gate's rate to per_second capped at the
// provider's MaxSendRate and returns it; u.mu is held.
func (u *quotaUpstream) capRateLocked() float64 {
	rate := u.perSecond
	if u.q.MaxSendRate > 0 {
		rate = min(rate, u.q.MaxSendRate)
	}
	u.gate.SetRate(rate)
	return rate
}

// applyLocked sets the exhausted flag and the remaining gauge from the
// quota and the local count; u.mu is held.
func (w *quotaWatch) applyLocked(u *quotaUpstream) {
	exhausted := u.q.Exhausted(u.sentSince)
	u.gate.SetQuotaExhausted(exhausted)
	w.metrics.remaining24h.WithLabelValues(u.name).Set(u.q.Remaining24h(u.sentSince))
	if exhausted != u.exhausted {
		if exhausted {
			w.log.Warn("provider 24-hour quota used up; upstream skipped until it frees", "upstream", u.name,
				"max_24h", u.q.Max24HourSend, "sent_24h", u.q.SentLast24Hours+u.sentSince)
		} else {
			w.log.Info("provider 24-hour quota available again", "upstream", u.name)
		}
	}
	u.exhausted = exhausted
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
