package relay

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// Models the hardening issue's outage: three messages with a UTF-8
// address, sent to the route's only upstream, a smarthost without
// SMTPUTF8, opened its breaker (failures: 3) and none of the five ordinary
// messages after them were delivered. A message the upstream cannot carry
// says nothing about the upstream's health: the breaker stays closed, the
// ordinary mail goes through, and the UTF-8 messages are dead-lettered at
// once as unsupported, since no upstream of the route can carry them.
func TestDelivery_UnsupportedDoesNotOpenBreaker(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{}) // no SMTPUTF8
	var mu sync.Mutex
	var mailFrom []string
	sink.SetScript(testsmtp.Script{Mail: func(from string) error {
		mu.Lock()
		defer mu.Unlock()
		mailFrom = append(mailFrom, from)
		return nil
	}})
	routes := []policy.RouteConfig{{Name: "default", Upstreams: []string{"smarthost"}, Strategy: "failover"}}
	tr := startRelay(t, nil, routes, func(c *Config) {
		u := upstreams.Config{Name: "smarthost", Type: "smtp", Address: sink.Addr, TLS: "none",
			CircuitBreaker: upstreams.CircuitBreaker{Failures: 3, OpenFor: time.Hour}, Timeout: 5 * time.Second}
		u.ApplyDefaults()
		c.Upstreams = append(c.Upstreams, u)
	})
	gate := tr.engine.Load().gates["smarthost"]

	utf8Rcpts := []string{"jörg@example.net", "zoë@example.net", "用户@example.net"}
	for _, rcpt := range utf8Rcpts {
		if err := tr.send("a@example.com", []string{rcpt}, simpleMsg); err != nil {
			t.Fatalf("relay refused %s: %v", rcpt, err)
		}
	}
	waitFor(t, "the UTF-8 messages to be dead-lettered (or the breaker to open)", func() bool {
		return gate.State() == gobreaker.StateOpen || len(tr.deadEnvelopes(t)) == 3 && tr.queue.len() == 0
	})
	if s := gate.State(); s != gobreaker.StateClosed {
		t.Fatalf("breaker is %s after messages the upstream cannot carry; want closed", s)
	}

	for i := range 5 {
		if err := tr.send("a@example.com", []string{fmt.Sprintf("rcpt%d@example.net", i)}, simpleMsg); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the five ordinary messages", func() bool { return sink.Count() == 5 && tr.queue.len() == 0 })
	if s := gate.State(); s != gobreaker.StateClosed {
		t.Errorf("breaker is %s; want closed", s)
	}
	if envs, _ := tr.spool.List(); len(envs) != 0 {
		t.Errorf("%d messages left in the spool", len(envs))
	}
	mu.Lock()
	if len(mailFrom) != 5 {
		t.Errorf("the smarthost saw %d MAIL commands; want 5 (none for the UTF-8 messages)", len(mailFrom))
	}
	mu.Unlock()

	dead := tr.deadEnvelopes(t)
	if len(dead) != 3 {
		t.Fatalf("%d dead letters, want 3", len(dead))
	}
	var got []string
	for _, d := range dead {
		got = append(got, d.Rcpts...)
		if !strings.Contains(d.DeadReason, "unsupported") || !strings.Contains(d.DeadReason, "SMTPUTF8") {
			t.Errorf("dead reason %q: want it to say unsupported (SMTPUTF8)", d.DeadReason)
		}
		if d.Attempts > 1 {
			t.Errorf("%v: %d attempts; a message no upstream can carry is not retried", d.Rcpts, d.Attempts)
		}
	}
	slices.Sort(got)
	want := slices.Sorted(slices.Values(utf8Rcpts))
	if !slices.Equal(got, want) {
		t.Errorf("dead letters are for %v, want %v", got, want)
	}
}
