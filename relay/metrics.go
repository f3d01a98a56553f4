package relay

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

type metrics struct {
	received    prometheus.Counter
	deliveries  *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	rateLimited *prometheus.CounterVec
	skipped     *prometheus.CounterVec
	smtpRefused *prometheus.CounterVec
	connections prometheus.Gauge
	authFailed  prometheus.Counter
	deadTotal   prometheus.Counter
	broken      prometheus.Counter
}

// newMetrics registers on reg, a private registry per Relay, so tests and
// embedded relays never share global state.
func newMetrics(reg prometheus.Registerer, gates map[string]*policy.Gate, spoolLen, oldestAge, deadLen func() float64) *metrics {
	m := &metrics{
		received: prometheus.NewCounter(prometheus.CounterOpts{Name: "relaycar_messages_received_total",
			Help: "Messages accepted with 250 and committed to the spool."}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relaycar_deliveries_total",
			Help: "Delivery attempts per upstream by result: delivered or the error class."}, []string{"upstream", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "relaycar_delivery_duration_seconds",
			Help: "Time an upstream took to accept or fail a message.", Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 10)}, []string{"upstream"}),
		rateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relaycar_upstream_rate_limited_total",
			Help: "Times an upstream was skipped because its rate limit had no token within max_wait."}, []string{"upstream"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relaycar_upstream_skipped_total",
			Help: "Times an upstream was not tried for a message, by reason."}, []string{"upstream", "reason"}),
		smtpRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relaycar_smtp_refused_total",
			Help: "SMTP commands refused by the listener, by reply code."}, []string{"code"}),
		connections: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relaycar_smtp_connections",
			Help: "SMTP connections open now."}),
		authFailed: prometheus.NewCounter(prometheus.CounterOpts{Name: "relaycar_smtp_auth_failures_total",
			Help: "Failed SMTP AUTH attempts."}),
		deadTotal: prometheus.NewCounter(prometheus.CounterOpts{Name: "relaycar_dead_lettered_total",
			Help: "Messages moved to the dead-letter directory."}),
		broken: prometheus.NewCounter(prometheus.CounterOpts{Name: "relaycar_spool_broken_total",
			Help: "Unreadable envelopes quarantined as .broken at start."}),
	}
	reg.MustRegister(m.received, m.deliveries, m.duration, m.rateLimited, m.skipped, m.smtpRefused, m.connections, m.authFailed, m.deadTotal, m.broken,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_spool_messages",
		Help: "Messages in the spool waiting for delivery."}, spoolLen))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_spool_oldest_message_age_seconds",
		Help: "Age of the oldest message waiting in the spool; 0 when empty."}, oldestAge))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_dead_letter_messages",
		Help: "Messages in the dead-letter directory."}, deadLen))
	for name, g := range gates {
		g := g
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_upstream_breaker_state",
			Help: "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ConstLabels: prometheus.Labels{"upstream": name}},
			func() float64 { return breakerValue(g.State()) }))
		// Pre-create the series so dashboards see zeros, not gaps.
		m.rateLimited.WithLabelValues(name)
		m.deliveries.WithLabelValues(name, "delivered")
		for _, c := range upstreams.Classes {
			m.deliveries.WithLabelValues(name, c.String())
		}
	}
	return m
}

// registerSharedUp exports whether Redis answers for the shared limits.
func registerSharedUp(reg prometheus.Registerer, up func() bool) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_rate_limit_shared_up",
		Help: "1 while Redis answers for the shared rate limits, 0 while each replica uses its local fallback."},
		func() float64 {
			if up() {
				return 1
			}
			return 0
		}))
}

func breakerValue(s gobreaker.State) float64 {
	switch s {
	case gobreaker.StateHalfOpen:
		return 1
	case gobreaker.StateOpen:
		return 2
	}
	return 0
}

func itoa(i int) string { return strconv.Itoa(i) }
