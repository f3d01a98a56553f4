package tests

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

func sinkUpstream(sink *testsmtp.Server) string {
	return fmt.Sprintf(`
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr)
}

// listen.max_connections: connections beyond it get 421 4.3.2 at connect,
// relaycar_smtp_connections shows the open ones, and the relay serves
// normally once they close.
func TestHardening_MaxConnections421(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	h := newHarness(t, "listen:\n  max_connections: 3\n"+sinkUpstream(sink))

	var held []*rawConn
	for range 3 {
		c := h.dialRaw()
		c.expect(220)
		c.cmd(250, "EHLO tests.local")
		held = append(held, c)
	}
	over := h.dialRaw()
	if msg := over.expect(421); !strings.HasPrefix(msg, "4.3.2 ") {
		t.Errorf("beyond max_connections: 421 %s, want 421 4.3.2", msg)
	}
	if b, _ := io.ReadAll(over.c); len(b) != 0 {
		t.Errorf("refused connection got more: %q", b)
	}
	if v := h.metric("relaycar_smtp_refused_total", "code=421"); v != 1 {
		t.Errorf(`relaycar_smtp_refused_total{code="421"} = %v, want 1`, v)
	}
	if v := h.metric("relaycar_smtp_connections"); v != 3 {
		t.Errorf("relaycar_smtp_connections = %v, want 3", v)
	}
	for _, c := range held {
		c.cmd(221, "QUIT")
		c.c.Close()
	}
	waitFor(t, 5*time.Second, "relaycar_smtp_connections to drop to 0", func() bool { return h.metric("relaycar_smtp_connections") == 0 })
	for seq := 1; seq <= 4; seq++ { // more than the cap, one after the other
		h.mustSend(sender, []string{recipient}, message(sender, recipient, seq, "after the cap"))
	}
	waitFor(t, 10*time.Second, "the four messages at the sink", func() bool { return sink.Count() == 4 })
	if v := h.metric("relaycar_smtp_refused_total", "code=421"); v != 1 {
		t.Errorf(`relaycar_smtp_refused_total{code="421"} = %v after normal traffic, want 1`, v)
	}
}

// A command line dripped a byte at a time ends the connection after one
// read_timeout (it used to take four, answered with "Bad command" each).
func TestHardening_DrippedCommandLineTimesOut(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	h := newHarness(t, "listen:\n  read_timeout: 1s\n"+sinkUpstream(sink))
	c := h.dialRaw()
	c.expect(220)
	c.cmd(250, "EHLO tests.local")
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 80 { // 8s at most
			if _, err := c.c.Write([]byte("x")); err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	out, _ := io.ReadAll(c.c) // the harness's 15s deadline bounds this
	took := time.Since(start)
	<-done
	if took > 2500*time.Millisecond {
		t.Errorf("connection held %s by a dripping client, want about read_timeout (1s); got %q", took, out)
	}
	if !strings.Contains(string(out), "421 4.4.2") {
		t.Errorf("no 421 4.4.2 before the close: %q", out)
	}
	h.mustSend(sender, []string{recipient}, message(sender, recipient, 1, "after the drip"))
}

// listen.trusted_networks: X-Relay-* routing headers steer only clients
// in it; from others they are still removed, routing ignores them, and
// the log says so.
func TestHardening_RelayHeadersOnlyFromTrustedNetworks(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, trusted, wantSink string
	}{
		{"untrusted loopback", "[10.0.0.0/8]", "default"},
		{"trusted loopback", "[127.0.0.0/8]", "marketing"},
		{"empty list trusts all", "[]", "marketing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			mkt, def := testsmtp.Start(t, testsmtp.Options{}), testsmtp.Start(t, testsmtp.Options{})
			h := newHarness(t, fmt.Sprintf(`
listen:
  trusted_networks: %s
upstreams:
  - {name: mkt, type: smtp, address: %q, tls: none}
  - {name: def, type: smtp, address: %q, tls: none}
routes:
  - {name: marketing, match: {headers: {X-Relay-Route: marketing}}, upstreams: [mkt]}
  - {name: default, upstreams: [def]}
`, tc.trusted, mkt.Addr, def.Addr))
			h.mustSend(sender, []string{recipient}, "X-Relay-Route: marketing\r\n"+message(sender, recipient, 1, "route"))
			got, other := mkt, def
			if tc.wantSink == "default" {
				got, other = def, mkt
			}
			waitFor(t, 10*time.Second, "delivery on the "+tc.wantSink+" route", func() bool { return got.Count() == 1 })
			h.waitSpoolEmpty(10 * time.Second)
			if n := other.Count(); n != 0 {
				t.Errorf("%d messages on the other route", n)
			}
			data := string(got.Messages()[0].Data)
			if strings.Contains(strings.ToLower(data), "x-relay-") {
				t.Errorf("X-Relay header delivered:\n%s", data)
			}
			if !slices.Equal(seqs(t, got), []int{1}) {
				t.Errorf("seqs = %v", seqs(t, got))
			}
			ignored := h.logContains("X-Relay-* headers ignored for routing")
			if ignored != (tc.wantSink == "default") {
				t.Errorf("log says headers ignored: %v, want %v", ignored, tc.wantSink == "default")
			}
		})
	}
}
