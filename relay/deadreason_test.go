package relay

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/upstreams"
)

// After a provider fault opens the breaker, later attempts only see
// "skipped: breaker_open"; the dead letter must still name the 535 that
// caused it, and the queue API must show it while the message waits.
func TestDelivery_DeadReasonKeepsLastUpstreamError(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{&upstreams.Error{Upstream: "a", Class: upstreams.ProviderFault, Code: "535 5.7.8", Reason: "auth: bad credentials"}}}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Spool.MaxAge = 2 * time.Second
		c.Upstreams[0].CircuitBreaker.OpenFor = time.Hour
	})
	tr.send("a@example.com", []string{"b@example.net"}, simpleMsg)
	waitFor(t, "queued message with the upstream error", func() bool {
		envs, _ := tr.spool.List()
		return len(envs) == 1 && strings.Contains(envs[0].UpstreamErrors["a"], "535")
	})
	resp, err := http.Get("http://" + tr.admin + "/api/queue")
	if err != nil {
		t.Fatal(err)
	}
	var list []QueueEntry
	json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if len(list) != 1 || !strings.Contains(list[0].UpstreamErrors["a"], "535 5.7.8") {
		t.Errorf("/api/queue = %+v: want upstream_errors with the 535", list)
	}
	tr.waitDead(t, 1)
	d := tr.deadEnvelopes(t)[0]
	if !strings.Contains(d.DeadReason, "breaker_open") {
		t.Errorf("dead reason %q: want the last attempt's breaker_open too", d.DeadReason)
	}
	if !strings.Contains(d.DeadReason, "535 5.7.8") || !strings.Contains(d.DeadReason, "bad credentials") {
		t.Errorf("dead reason %q does not name the 535 that opened the breaker", d.DeadReason)
	}
	if a.calls() != 1 {
		t.Errorf("upstream called %d times; the open breaker should have kept it at 1", a.calls())
	}
}
