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
	reloadOK    prometheus.Gauge
	reloadTime  prometheus.Gauge
	smtpRefused *prometheus.CounterVec
	connections prometheus.Gauge
	authFailed  prometheus.Counter
	deadTotal   prometheus.Counter
	broken      prometheus.Counter
}

// newMetrics registers on reg, a private registry per Relay, so tests and
// embedded relays never share global state.
func newMetrics(reg prometheus.Registerer, gates func() []*policy.Gate, spoolLen, oldestAge, deadLen func() float64) *metrics {
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
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relaycar_config_last_reload_successful",
			Help: "1 if the last config reload was applied (or none was tried), 0 if it failed."}),
		reloadTime: prometheus.NewGauge(prometheus.GaugeOpts{Name: "relaycar_config_last_reload_success_timestamp_seconds",
			Help: "When the config was last loaded or reloaded successfully (Unix seconds)."}),
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
	m.reloadOK.Set(1)
	m.reloadTime.SetToCurrentTime()
	reg.MustRegister(m.reloadOK, m.reloadTime)
	reg.MustRegister(m.received, m.deliveries, m.duration, m.rateLimited, m.skipped, m.smtpRefused, m.connections, m.authFailed, m.deadTotal, m.broken,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_spool_messages",
		Help: "Messages in the spool waiting for delivery."}, spoolLen))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_spool_oldest_message_age_seconds",
		Help: "Age of the oldest message waiting in the spool; 0 when empty."}, oldestAge))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_dead_letter_messages",
		Help: "Messages in the dead-letter directory."}, deadLen))
	// Read at each scrape: a reload adds and removes upstreams.
	if gates != nil {
		reg.MustRegister(&breakerCollector{gates: gates})
		m.precreate(gates())
	}
	return m
}

// precreate makes the series of these upstreams exist, so dashboards see
// zeros, not gaps.
func (m *metrics) precreate(gates []*policy.Gate) {
	for _, g := range gates {
		name := g.Name()
		m.rateLimited.WithLabelValues(name)
		m.deliveries.WithLabelValues(name, "delivered")
		for _, c := range upstreams.Classes {
			m.deliveries.WithLabelValues(name, c.String())
		}
	}
}

var breakerDesc = prometheus.NewDesc("relaycar_upstream_breaker_state",
	"Circuit breaker state: 0 closed, 1 half-open, 2 open.", []string{"upstream"}, nil)

// breakerCollector reports the breaker state of the current engine's
// upstreams.
type breakerCollector struct{ gates func() []*policy.Gate }

func (c *breakerCollector) Describe(ch chan<- *prometheus.Desc) { ch <- breakerDesc }

func (c *breakerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, g := range c.gates() {
		ch <- prometheus.MustNewConstMetric(breakerDesc, prometheus.GaugeValue, breakerValue(g.State()), g.Name())
	}
}

// registerSharedUp exports whether Redis takes the shared limits' writes.
func registerSharedUp(reg prometheus.Registerer, up func() bool) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "relaycar_rate_limit_shared_up",
		Help: "1 while Redis takes the shared rate limits' writes, 0 while each replica uses its local fallback."},
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

// quotaMetrics are the provider quotas of rate_limit.from_provider
// upstreams; a series appears with the first successful read.
type quotaMetrics struct {
	maxSendRate, remaining24h, sandbox *prometheus.GaugeVec
}

func newQuotaMetrics(reg prometheus.Registerer) *quotaMetrics {
	m := &quotaMetrics{
		maxSendRate: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "relaycar_upstream_quota_max_send_rate",
			Help: "The provider's maximum send rate (recipients per second), e.g. SES MaxSendRate."}, []string{"upstream"}),
		remaining24h: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "relaycar_upstream_quota_remaining_24h",
			Help: "Recipients left in the provider's 24-hour quota, counting our sends since the last read; -1 unlimited."}, []string{"upstream"}),
		sandbox: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "relaycar_upstream_sandbox",
			Help: "1 while the provider account is in the sandbox (SES: no production access), else 0."}, []string{"upstream"}),
	}
	reg.MustRegister(m.maxSendRate, m.remaining24h, m.sandbox)
	return m
}
