package smtp_test

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"
)

// relaycar: MaxCommandLineLength bounds the lines outside message data,
// which textproto holds whole in memory, while DATA keeps MaxLineLength
// (it streams), before and after a message.
func TestServer_CommandLineLimit(t *testing.T) {
	be, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) {
		s.MaxLineLength = 1 << 20
		s.MaxCommandLineLength = 4096
	})
	defer s.Close()
	defer c.Close()
	expect := func(cmd, prefix string) {
		t.Helper()
		io.WriteString(c, cmd)
		scanner.Scan()
		if !strings.HasPrefix(scanner.Text(), prefix) {
			t.Fatalf("reply to %.40q = %q, want %s…", cmd, scanner.Text(), prefix)
		}
	}
	expect("AUTH PLAIN\r\n", "334 ")
	expect("AHVzZXJuYW1lAHBhc3N3b3Jk\r\n", "235 ")
	// Up to the limit, a command is read as before.
	expect("NOOP "+strings.Repeat("n", 4000)+"\r\n", "250 ")
	expect("MAIL FROM:<root@nsa.gov>\r\n", "250 ")
	expect("RCPT TO:<root@gchq.gov.uk>\r\n", "250 ")
	expect("DATA\r\n", "354 ")
	long := strings.Repeat("x", 100_000)
	expect("Subject: long\r\n\r\n"+long+"\r\n.\r\n", "250 ")
	if len(be.messages) != 1 || !strings.Contains(string(be.messages[0].Data), long) {
		t.Fatalf("the message with a 100,000-byte line was not kept whole")
	}
	// After the message, commands are bounded again.
	expect("NOOP "+strings.Repeat("n", 5000)+"\r\n", "500 5.4.0 ")
}

// relaycar: MaxMessageBytesFunc is read at each EHLO and DATA, so a limit
// changed while serving applies to the next transaction.
func TestServer_MaxMessageBytesFunc(t *testing.T) {
	var limit atomic.Int64
	limit.Store(100)
	_, s, c, scanner, caps := testServerEhlo(t, func(s *smtp.Server) { s.MaxMessageBytesFunc = limit.Load })
	defer s.Close()
	defer c.Close()
	if !caps["SIZE 100"] {
		t.Fatalf("caps = %v, want SIZE 100", caps)
	}
	expect := func(cmd, prefix string) {
		t.Helper()
		io.WriteString(c, cmd)
		scanner.Scan()
		if !strings.HasPrefix(scanner.Text(), prefix) {
			t.Fatalf("reply to %.40q = %q, want %s…", cmd, scanner.Text(), prefix)
		}
	}
	expect("AUTH PLAIN\r\n", "334 ")
	expect("AHVzZXJuYW1lAHBhc3N3b3Jk\r\n", "235 ")
	body := "Subject: x\r\n\r\n" + strings.Repeat("y", 500) + "\r\n.\r\n"
	expect("MAIL FROM:<root@nsa.gov> SIZE=600\r\n", "552 ")
	limit.Store(1000)
	expect("MAIL FROM:<root@nsa.gov> SIZE=600\r\n", "250 ")
	expect("RCPT TO:<root@gchq.gov.uk>\r\n", "250 ")
	expect("DATA\r\n", "354 ")
	expect(body, "250 ")
	limit.Store(100)
	expect("MAIL FROM:<root@nsa.gov>\r\n", "250 ")
	expect("RCPT TO:<root@gchq.gov.uk>\r\n", "250 ")
	expect("DATA\r\n", "354 ")
	expect(body, "552 ")
}

// relaycar: a BDAT chunk is bytes, not lines, whether kept or discarded;
// the command after it is counted from its own start.
func TestServer_CommandLineLimitAfterBDAT(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) {
		s.MaxLineLength = 1 << 20
		s.MaxCommandLineLength = 4096
	})
	defer s.Close()
	defer c.Close()
	expect := func(cmd, prefix string) {
		t.Helper()
		io.WriteString(c, cmd)
		scanner.Scan()
		if !strings.HasPrefix(scanner.Text(), prefix) {
			t.Fatalf("reply to %.40q = %q, want %s…", cmd, scanner.Text(), prefix)
		}
	}
	expect("AUTH PLAIN\r\n", "334 ")
	expect("AHVzZXJuYW1lAHBhc3N3b3Jk\r\n", "235 ")
	chunk := "Subject: x\r\n\r\n" + strings.Repeat("z", 6000)
	// Discarded: no transaction yet.
	expect(fmt.Sprintf("BDAT %d LAST\r\n%s", len(chunk), chunk), "502 ")
	expect("MAIL FROM:<root@nsa.gov>\r\n", "250 ")
	expect("RCPT TO:<root@gchq.gov.uk>\r\n", "250 ")
	expect(fmt.Sprintf("BDAT %d LAST\r\n%s", len(chunk), chunk), "250 ")
	expect("MAIL FROM:<root@nsa.gov>\r\n", "250 ")
}
