package relay

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"time"
)

// Envelope is the spool's commit record for one message: who it is from and
// for, how routing split it, and what happened on each attempt. It is
// rewritten atomically after every attempt, before the relay waits for the
// next one, so a restart resumes from it.
type Envelope struct {
	ID        string   `json:"id"`
	From      string   `json:"from"`
	Rcpts     []string `json:"rcpts"`
	MessageID string   `json:"message_id"`
	Size      int      `json:"size"`
	// BodyCRC is the CRC-32C of the .eml, to tell a body torn by a crash
	// before its commit from a good one.
	BodyCRC     string       `json:"body_crc,omitempty"`
	ReceivedAt  time.Time    `json:"received_at"`
	RemoteAddr  string       `json:"remote_addr,omitempty"`
	Routes      []RouteState `json:"routes"`
	Attempts    int          `json:"attempts"`
	NextAttempt time.Time    `json:"next_attempt"`
	LastError   string       `json:"last_error,omitempty"`
	// UpstreamErrors is the last error each upstream itself returned. The
	// last error of an attempt may only say that every upstream was
	// skipped (breaker open); the 535 that opened the breaker is here.
	UpstreamErrors map[string]string `json:"upstream_errors,omitempty"`
	Deliveries     []Delivery        `json:"deliveries,omitempty"`
	Failures       []Failure         `json:"failures,omitempty"`
	// DeadReason and DeadAt are set when the message is dead-lettered.
	DeadReason string     `json:"dead_reason,omitempty"`
	DeadAt     *time.Time `json:"dead_at,omitempty"`
}

// RouteState is one route's share of the recipients.
type RouteState struct {
	Route string `json:"route"`
	// Pending are the recipients not yet delivered or failed.
	Pending []string `json:"pending"`
	// Pinned is set after an ambiguous outcome (with on_ambiguous:
	// retry_same): only that upstream may be tried again, so the message is
	// never silently sent by two providers.
	Pinned string `json:"pinned,omitempty"`
}

// Delivery records recipients an upstream accepted.
type Delivery struct {
	Route      string    `json:"route"`
	Upstream   string    `json:"upstream"`
	ProviderID string    `json:"provider_id,omitempty"`
	Rcpts      []string  `json:"rcpts"`
	At         time.Time `json:"at"`
}

// Failure records recipients that will not be delivered, and why.
type Failure struct {
	Route    string    `json:"route"`
	Upstream string    `json:"upstream,omitempty"`
	Class    string    `json:"class"`
	Rcpts    []string  `json:"rcpts"`
	Reason   string    `json:"reason"`
	At       time.Time `json:"at"`
}

// pending reports whether any route still has recipients to deliver.
func (e *Envelope) pending() bool {
	for _, r := range e.Routes {
		if len(r.Pending) > 0 {
			return true
		}
	}
	return false
}

// upstreamError records err as the last error upstream returned.
func (e *Envelope) upstreamError(upstream string, err error) {
	if e.UpstreamErrors == nil {
		e.UpstreamErrors = map[string]string{}
	}
	e.UpstreamErrors[upstream] = err.Error()
}

// upstreamErrorsText lists the last error of each upstream, sorted by
// upstream name, for dead-letter reasons.
func (e *Envelope) upstreamErrorsText() string {
	names := slices.Sorted(maps.Keys(e.UpstreamErrors))
	parts := make([]string, 0, len(names))
	for _, n := range names {
		parts = append(parts, e.UpstreamErrors[n])
	}
	return strings.Join(parts, "; ")
}

// encodeEnvelope is the one on-disk form of an envelope: indented, so an
// operator can read a spool file at 3 a.m.
func encodeEnvelope(e *Envelope) ([]byte, error) { return json.MarshalIndent(e, "", "  ") }
