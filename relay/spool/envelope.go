package spool

import "time"

// Envelope is one message's state: who it is from and for, how routing
// split it, and what happened on each attempt. The JSON names are those of
// the v1 .json files, so a v1 envelope decodes into it unchanged.
type Envelope struct {
	// Version is the spool format that wrote this record (2); v1 files
	// have none.
	Version   int      `json:"v,omitempty"`
	ID        string   `json:"id"`
	From      string   `json:"from"`
	Rcpts     []string `json:"rcpts"`
	MessageID string   `json:"message_id"`
	Size      int      `json:"size"`
	// BodyCRC is the CRC-32C of the body as hex, set by Commit; Load
	// compares it with the bytes on disk.
	BodyCRC    string    `json:"body_crc,omitempty"`
	ReceivedAt time.Time `json:"received_at"`
	RemoteAddr string    `json:"remote_addr,omitempty"`
	// Hops counts how often the message was handed from a shutting-down
	// relay to a peer (shutdown.drain_to, relaycar drain).
	Hops        int          `json:"hops,omitempty"`
	Routes      []RouteState `json:"routes"`
	Attempts    int          `json:"attempts"`
	NextAttempt time.Time    `json:"next_attempt"`
	LastError   string       `json:"last_error,omitempty"`
	// UpstreamErrors is the last error each upstream itself returned: an
	// attempt's LastError may only say that every upstream was skipped.
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
	// Pinned is set after an ambiguous outcome (on_ambiguous: retry_same):
	// only that upstream may be tried again, so the message is never
	// silently sent by two providers.
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

// FailureClass says why recipients failed for good: an upstream class
// (rejected, unsupported...) or expired, when max_age ran out.
type FailureClass string

// The failure classes the relay writes itself; the others are the
// upstream classes' names.
const (
	FailedRejected FailureClass = "rejected"
	FailedExpired  FailureClass = "expired"
)

// Failure records recipients that will not be delivered, and why.
type Failure struct {
	Route    string       `json:"route"`
	Upstream string       `json:"upstream,omitempty"`
	Class    FailureClass `json:"class"`
	Rcpts    []string     `json:"rcpts"`
	Reason   string       `json:"reason"`
	At       time.Time    `json:"at"`
}

// Pending reports whether any route still has recipients to deliver.
func (e *Envelope) Pending() bool {
	for _, r := range e.Routes {
		if len(r.Pending) > 0 {
			return true
		}
	}
	return false
}
