package relay

import (
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// sharedState is the Redis client behind every rate_limit.shared upstream
// of this relay, and the throttle pauses they share.
type sharedState struct {
	redis  *policy.Shared
	pauses policy.Pauses
}

// newShared connects to cfg.Redis when some upstream has a shared limit;
// otherwise r.shared stays nil (no Redis client, no gauge).
func (r *Relay) newShared() {
	for _, uc := range r.cfg.Upstreams {
		if !uc.RateLimit.Shared {
			continue
		}
		rc := r.cfg.Redis
		s := policy.NewShared(policy.SharedOptions{Address: rc.Address, Password: rc.Password.Reveal(), TLS: rc.TLS,
			KeyPrefix: rc.KeyPrefix, Replicas: rc.Replicas, Logger: r.log})
		r.shared = &sharedState{redis: s, pauses: s.Pauses()}
		return
	}
}

// gateHooks are an upstream's gate hooks: the shared limit and pauses for
// rate_limit.shared, the local ones otherwise. Either record of pauses is
// the relay's, not the gate's, so a gate rebuilt by a reload is still paused.
func (r *Relay) gateHooks(uc upstreams.Config) policy.GateHooks {
	// The gate ends a pause by the clock the adapters stamp RetryAt with.
	h := policy.GateHooks{OnStateChange: r.breakerChanged, Now: r.now, Pauses: r.pauses}
	if r.shared != nil && uc.RateLimit.Shared {
		h.Limiter = r.shared.redis.Limiter(uc.Name, uc.RateLimit.PerSecond, uc.RateLimit.Burst)
		h.Pauses = r.shared.pauses
	} else if uc.RateLimit.Shared {
		// Only a reload gets here: New connects to Redis when any
		// upstream is shared.
		r.log.Warn("rate_limit.shared needs a restart to connect to Redis; using a local limit until then", "upstream", uc.Name)
	}
	return h
}

// closeShared closes the Redis client once nothing delivers.
func (r *Relay) closeShared() {
	if r.shared != nil {
		r.shared.redis.Close()
	}
}
