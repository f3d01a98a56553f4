package tests

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/internal/testwait"
)

// Models the spool volume filling up while the only upstream is down: the
// relay must answer 451 (the client keeps the message), keep nothing half
// written, go on serving, and deliver everything it acknowledged once the
// upstream is back and space frees up.
func TestDiskFull_451NothingLostAndRecovers(t *testing.T) {
	small := testwait.Tmpfs(t, "600k")
	sink := testsmtp.Start(t, testsmtp.Options{})
	sinkAddr := sink.Addr
	sink.Stop() // upstream down: accepted mail piles up in the spool
	h := newHarness(t, fmt.Sprintf(`
spool: {dir: %s}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none, circuit_breaker: {failures: 5, open_for: 1s}}
routes:
  - {name: default, upstreams: [sink]}
`, filepath.Join(small, "spool"), sinkAddr))

	body := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 1600) // ~100 KB
	var accepted []string
	refused := false
	for i := 0; i < 20 && !refused; i++ {
		id, err := h.send("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", i, "fill")+body)
		switch {
		case err == nil:
			accepted = append(accepted, id)
		case smtpCode(err) == 451:
			refused = true
			var se *smtp.SMTPError
			if !errors.As(err, &se) || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 0}) || strings.Contains(se.Message, small) {
				t.Errorf("refusal = %v, want a generic 451 4.3.0", err)
			}
		default:
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if !refused || len(accepted) == 0 {
		t.Fatalf("accepted %d, refused %v: the 600k spool should fill after a few 100 KB messages", len(accepted), refused)
	}
	t.Logf("accepted %d messages, then 451", len(accepted))
	// Exactly the acknowledged messages are on disk, nothing half-written.
	if got := h.spoolIDs(); len(got) != len(accepted) {
		t.Errorf("spool holds %v, acknowledged %v", got, accepted)
	}
	if tmp := h.tmpFiles(); len(tmp) > 0 {
		t.Errorf("leftover temp files: %v", tmp)
	}
	// Still serving: a small message may or may not fit, but the reply is
	// clean and the process is alive.
	if code, _ := h.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while the disk is full", code)
	}
	if _, err := h.send("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", 99, "small")); err != nil && smtpCode(err) != 451 {
		t.Errorf("small message on a full disk: %v, want 250 or 451", err)
	}

	// The upstream comes back: everything acknowledged is delivered.
	sink.Restart()
	h.waitSpoolEmpty(30 * time.Second)
	got := map[string]bool{}
	for _, m := range sink.Messages() {
		got[header(t, m.Data, "X-Test-Seq")] = true
	}
	for i := range accepted {
		if !got[fmt.Sprint(i)] {
			t.Errorf("acknowledged message %d (%s) was not delivered", i, accepted[i])
		}
	}
	// And with space back, new mail is accepted again.
	h.mustSend("app@example.com", []string{"user@example.net"}, message("app@example.com", "user@example.net", 100, "after")+body)
}
