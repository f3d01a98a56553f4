package upstreams

import (
	"context"

	"github.com/aws/aws-sdk-go-v2/service/sesv2"
)

// Quota is a provider account's own sending limit, as the provider reports
// it. Counts are recipients (SES counts each destination as one email).
type Quota struct {
	// MaxSendRate is the most recipients per second; 0 when not known.
	MaxSendRate float64
	// Max24HourSend and SentLast24Hours are the rolling 24-hour quota and
	// its use; Max24HourSend is -1 for unlimited.
	Max24HourSend   float64
	SentLast24Hours float64
	// Sandbox is an account that may only mail verified addresses.
	Sandbox bool
	// SendingEnabled is false when the provider paused the account.
	SendingEnabled bool
	// Enforcement is the provider's word on the account (SES HEALTHY,
	// PROBATION, SHUTDOWN); may be empty.
	Enforcement string
}

// Unlimited24h reports that the 24-hour quota has no end.
func (q Quota) Unlimited24h() bool { return q.Max24HourSend < 0 }

// Exhausted reports that the 24-hour quota is used up, counting extra
// recipients sent since the provider's figure was read.
func (q Quota) Exhausted(extra float64) bool {
	return !q.Unlimited24h() && q.SentLast24Hours+extra >= q.Max24HourSend
}

// Remaining24h is what is left of the 24-hour quota after extra local
// sends; -1 for unlimited, never below 0 otherwise.
func (q Quota) Remaining24h(extra float64) float64 {
	if q.Unlimited24h() {
		return -1
	}
	return max(0, q.Max24HourSend-q.SentLast24Hours-extra)
}

// QuotaReader is implemented by upstreams whose provider reports its own
// sending quota (rate_limit.from_provider). A read sends no mail.
type QuotaReader interface {
	Quota(ctx context.Context) (Quota, error)
}

// Quota reads the account's quota with SES GetAccount (ses:GetAccount).
// The error is an *Error classified as a failed send would be.
func (s *sesUpstream) Quota(ctx context.Context) (Quota, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, s.timeout, apiTimeoutCause(s.timeout))
	defer cancel()
	ctx, progress := apiTrace(ctx)
	out, err := s.client.GetAccount(ctx, &sesv2.GetAccountInput{})
	if err != nil {
		e := s.classify(ctx, err, progress)
		if e.Class == Ambiguous {
			// A read cannot have sent anything.
			e.Class = Transient
		}
		return Quota{}, e
	}
	q := Quota{Sandbox: !out.ProductionAccessEnabled, SendingEnabled: out.SendingEnabled, Max24HourSend: -1}
	if out.EnforcementStatus != nil {
		q.Enforcement = *out.EnforcementStatus
	}
	if sq := out.SendQuota; sq != nil {
		q.MaxSendRate, q.Max24HourSend, q.SentLast24Hours = sq.MaxSendRate, sq.Max24HourSend, sq.SentLast24Hours
	}
	return q, nil
}

var _ QuotaReader = (*sesUpstream)(nil)

// validateFromProvider allows rate_limit.from_provider only where the
// provider reports a quota, and with a per_second to cap: the gate has no
// limiter to lower otherwise.
func validateFromProvider(c *Config, bad badFunc) {
	if !c.RateLimit.FromProvider {
		return
	}
	if c.Type != string(kindSES) {
		bad("rate_limit.from_provider", "only type ses reports its quota (SES GetAccount); not type %s", c.Type)
		return
	}
	if c.RateLimit.PerSecond <= 0 {
		bad("rate_limit.per_second", "required with from_provider: the ceiling the provider's MaxSendRate lowers")
	}
}
