// Package adminapi spells the admin HTTP API's paths and request header
// once, for the server (relay) and the CLI (cmd/relaycar) that calls it.
package adminapi

// Paths served by the admin listener.
const (
	Healthz  = "/healthz"
	Readyz   = "/readyz"
	Metrics  = "/metrics"
	Queue    = "/api/queue"
	Dead     = "/api/dead"
	RetryAll = Queue + "/retry"
)

// Message is the path of one queued or dead message (DELETE drops it);
// the server registers it with id "{id}".
func Message(id string) string { return Queue + "/" + id }

// Retry is the path that retries one message (POST).
func Retry(id string) string { return Message(id) + "/retry" }

// ChangeHeader must be set to "1" on every state change: a cross-site
// form cannot send a custom header.
const ChangeHeader = "X-Relaycar-Request"
