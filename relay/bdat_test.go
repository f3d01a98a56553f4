package relay

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"
)

// go-smtp ends a BDAT chunk that the client's EOF cut short as if it were
// complete; such a message must not be spooled (nor delivered truncated).
func TestSMTP_TruncatedBDATLastNotSpooled(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	c, err := net.Dial("tcp", tr.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	expect := func(prefix string) {
		t.Helper()
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("waiting for %s: %v", prefix, err)
			}
			if strings.HasPrefix(line, prefix+" ") {
				return
			}
			if !strings.HasPrefix(line, prefix+"-") {
				t.Fatalf("got %q, want %s", line, prefix)
			}
		}
	}
	expect("220")
	for _, cmd := range []string{"EHLO x", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.net>"} {
		c.Write([]byte(cmd + "\r\n"))
		expect("250")
	}
	c.Write([]byte("BDAT 100000 LAST\r\nSubject: cut\r\n\r\nonly seventy bytes of a hundred thousand arrive here\r\n"))
	c.(*net.TCPConn).CloseWrite()
	br.ReadString('\n') // whatever the relay answers, if anything
	time.Sleep(300 * time.Millisecond)
	if n := a.calls(); n != 0 {
		t.Fatalf("upstream called %d times for a truncated message", n)
	}
	if envs, _ := tr.spool.List(); len(envs) != 0 {
		t.Fatalf("truncated message spooled: %+v", envs[0])
	}
}
