package relay

import (
	"maps"
	"slices"
	"strings"

	"github.com/relaycar/relaycar/relay/spool"
)

// The spool owns the on-disk envelope; the relay, its API and the CLI
// speak of it by these names.
type (
	Envelope   = spool.Envelope
	RouteState = spool.RouteState
	Delivery   = spool.Delivery
	Failure    = spool.Failure
)

// noteUpstreamError records err as the last error upstream itself
// returned. The last error of an attempt may only say that every upstream
// was skipped (breaker open); the 535 that opened the breaker stays here.
func noteUpstreamError(e *Envelope, upstream string, err error) {
	if e.UpstreamErrors == nil {
		e.UpstreamErrors = map[string]string{}
	}
	e.UpstreamErrors[upstream] = err.Error()
}

// upstreamErrorsText lists the last error of each upstream, sorted by
// upstream name, for dead-letter reasons.
func upstreamErrorsText(e *Envelope) string {
	names := slices.Sorted(maps.Keys(e.UpstreamErrors))
	parts := make([]string, 0, len(names))
	for _, n := range names {
		parts = append(parts, e.UpstreamErrors[n])
	}
	return strings.Join(parts, "; ")
}
