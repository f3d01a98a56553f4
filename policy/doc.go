// Package policy decides where and when a message goes: which route its
// recipients match, the order in which a route's upstreams are tried
// (failover, round_robin, weighted), whether an upstream may be tried right
// now (circuit breaker, per-sender breaker, rate limit, size), and how long
// to wait before the next attempt.
//
// A Gate wraps one upstream. Admit says whether the upstream can take a
// message now, and why not; Send runs the upstream through its breakers so
// that every outcome is counted. Provider faults open the breaker at once,
// rejected messages never count against it, and a sender rejection opens only
// the (upstream, sender domain) breaker. Everything here is in memory and
// safe for concurrent use; nothing is persisted, except that a Shared
// limit and its throttle pauses live in Redis so that replicas share one
// provider quota. Redis is never on the critical path for long: while it
// does not answer, each replica limits itself to its share, locally.
package policy
