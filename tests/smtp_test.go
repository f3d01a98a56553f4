package tests

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

func TestSMTP_Refusals(t *testing.T) {
	t.Parallel()
	sink := testsmtp.Start(t, testsmtp.Options{})
	upstream := fmt.Sprintf(`
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: default, upstreams: [sink]}
`, sink.Addr)
	h := newHarness(t, `
listen:
  max_message_bytes: 10000
  max_recipients: 3
  allowed_senders: [example.com]
`+upstream)

	seq := 0
	// stillServes checks, after each refusal, that a normal message is
	// accepted and delivered.
	stillServes := func(t *testing.T) {
		t.Helper()
		seq++
		want := seq
		if _, err := h.send(sender, []string{recipient}, message(sender, recipient, seq, "normal")); err != nil {
			t.Fatalf("normal message after the refusal: %v", err)
		}
		waitFor(t, 10*time.Second, "the normal message at the sink", func() bool { return slices.Contains(seqs(t, sink), want) })
	}
	refused := func(code string) float64 { return h.metric("relaycar_smtp_refused_total", "code="+code) }

	t.Run("oversize DATA 552", func(t *testing.T) {
		big := message(sender, recipient, 1000, "too big") + strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 300)
		_, err := h.send(sender, []string{recipient}, big)
		if code := smtpCode(err); code != 552 {
			t.Errorf("oversize message: %v, want 552", err)
		}
		if v := refused("552"); v != 1 {
			t.Errorf(`relaycar_smtp_refused_total{code="552"} = %v, want 1`, v)
		}
		// A client that declares the size is refused before it sends.
		c := h.dialRaw()
		c.expect(220)
		c.cmd(250, "EHLO tests.local")
		c.cmd(552, "MAIL FROM:<%s> SIZE=20000", sender)
		c.cmd(221, "QUIT")
		stillServes(t)
	})

	t.Run("too many RCPT 452", func(t *testing.T) {
		rcpts := []string{"r1@example.net", "r2@example.net", "r3@example.net", "r4@example.net"}
		_, err := h.send(sender, rcpts, message(sender, rcpts[0], 1001, "too many rcpts"))
		if code := smtpCode(err); code != 452 || !strings.Contains(err.Error(), "r4@") {
			t.Errorf("4 recipients with max_recipients 3: %v, want 452 at the 4th RCPT", err)
		}
		stillServes(t)
	})

	t.Run("disallowed sender domain 550", func(t *testing.T) {
		_, err := h.send("someone@other.org", []string{recipient}, message("someone@other.org", recipient, 1002, "bad sender"))
		if code := smtpCode(err); code != 550 || !strings.HasPrefix(err.Error(), "MAIL") {
			t.Errorf("sender outside allowed_senders: %v, want 550 at MAIL", err)
		}
		if v := refused("550"); v != 1 {
			t.Errorf(`relaycar_smtp_refused_total{code="550"} = %v, want 1`, v)
		}
		stillServes(t)
	})

	t.Run("disallowed network 554 at connect", func(t *testing.T) {
		h2 := newHarness(t, `
listen:
  allowed_networks: ["10.0.0.0/8"]
`+upstream)
		c := h2.dialRaw()
		line, err := c.tp.ReadLine()
		if err != nil {
			t.Fatalf("reading greeting: %v", err)
		}
		if !strings.HasPrefix(line, "554 5.7.1") {
			t.Errorf("greeting from a disallowed network = %q, want 554 5.7.1", line)
		}
		if line, err := c.tp.ReadLine(); err == nil {
			t.Errorf("connection stays open after the 554, read %q", line)
		}
		if v := h2.metric("relaycar_smtp_refused_total", "code=554"); v != 1 {
			t.Errorf(`relaycar_smtp_refused_total{code="554"} = %v, want 1`, v)
		}
		if code, _ := h2.get("/healthz"); code != 200 {
			t.Errorf("GET /healthz on the refusing relay: %d", code)
		}
		stillServes(t)
	})

	t.Run("bare LF smuggling 550 5.6.0", func(t *testing.T) {
		c := h.dialRaw()
		c.expect(220)
		if ehlo := c.cmd(250, "EHLO tests.local"); !strings.Contains(ehlo, "SIZE 10000") {
			t.Errorf("EHLO does not advertise SIZE 10000 (listen.max_message_bytes):\n%s", ehlo)
		}
		c.cmd(250, "MAIL FROM:<%s>", sender)
		c.cmd(250, "RCPT TO:<%s>", recipient)
		c.cmd(354, "DATA")
		c.write("Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
		msg := c.expect(550)
		if !strings.HasPrefix(msg, "5.6.0") {
			t.Errorf("bare LF reply: 550 %s, want 550 5.6.0", msg)
		}
		// The session goes on: the smuggled commands were data, not commands.
		c.cmd(250, "RSET")
		c.cmd(221, "QUIT")
		if v := refused("550"); v != 2 {
			t.Errorf(`relaycar_smtp_refused_total{code="550"} = %v, want 2`, v)
		}
		stillServes(t)
		for _, m := range sink.Messages() {
			if m.From == "evil@x" || slices.Contains(m.To, "victim@y") || strings.Contains(string(m.Data), "smuggled") {
				t.Errorf("smuggled message reached the sink: %s -> %v\n%s", m.From, m.To, m.Data)
			}
		}
	})

	t.Run("bad recipient syntax 501", func(t *testing.T) {
		for _, rcpt := range []string{"no-at-sign", "user@", "a b@example.net"} {
			_, err := h.send(sender, []string{rcpt}, message(sender, recipient, 1003, "bad rcpt"))
			if code := smtpCode(err); code != 501 {
				t.Errorf("RCPT TO:<%s>: %v, want 501", rcpt, err)
			}
		}
		stillServes(t)
	})

	// Only the normal messages were delivered, each once.
	h.waitSpoolEmpty(10 * time.Second)
	got := seqs(t, sink)
	want := make([]int, seq)
	for i := range want {
		want[i] = i + 1
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("sink received seqs %v, want only the normal messages %v", got, want)
	}
	if v := h.metric("relaycar_messages_received_total"); v != float64(seq) {
		t.Errorf("relaycar_messages_received_total = %v, want %d", v, seq)
	}
	if ids := h.deadIDs(); len(ids) != 0 {
		t.Errorf("dead letters: %v", ids)
	}
}
