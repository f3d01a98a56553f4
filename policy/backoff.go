package policy

import (
	"math"
	"time"
)

// RetryConfig is relay.yaml `spool.retry`.
type RetryConfig struct {
	Initial    time.Duration `yaml:"initial"`
	Max        time.Duration `yaml:"max"`
	Multiplier float64       `yaml:"multiplier"`
}

// Backoff returns the wait before attempt number attempt+1, after attempt
// failed attempts (attempt >= 1). The exponential is computed in float64
// and capped at Max; jitter then takes up to a quarter off, so messages that
// failed together (an upstream outage, a restart) do not retry in lockstep,
// and the wait never exceeds Max. rnd returns a float in [0,1).
func Backoff(attempt int, r RetryConfig, rnd func() float64) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := float64(r.Initial) * math.Pow(r.Multiplier, float64(attempt-1))
	if r.Max > 0 && (d > float64(r.Max) || math.IsInf(d, 0) || math.IsNaN(d)) {
		d = float64(r.Max)
	}
	d *= 1 - 0.25*rnd()
	return time.Duration(d)
}
