package upstreams

import (
	"io"
	"testing"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

// bodyOf reads a message's whole body (tests only).
func bodyOf(m *Message) []byte {
	b, err := io.ReadAll(m.Reader())
	if err != nil {
		panic(err)
	}
	return b
}

// refusedErr returns the one error the refusals of a partial delivery
// carry (the adapters refuse all recipients of one Send alike), failing t
// if err is set, nothing was refused or the refusals differ.
func refusedErr(t *testing.T, rc Receipt, err error) *Error {
	t.Helper()
	if err != nil {
		t.Fatalf("partial delivery returned error %v", err)
	}
	if len(rc.Refused) == 0 {
		t.Fatalf("receipt %+v refuses nobody, want a partial delivery", rc)
	}
	e := rc.Refused[0].Err
	for _, f := range rc.Refused {
		if f.Err != e {
			t.Fatalf("refusals carry different errors: %v, %v", e, f.Err)
		}
	}
	return e
}

// The SMTP commands a scripted sink can answer with a reply of the test's.
const atMail, atRcpt, atData = "MAIL", "RCPT", "DATA"

// replyAt is a sink script answering reply at one command.
func replyAt(at string, reply error) testsmtp.Script {
	var sc testsmtp.Script
	switch at {
	case atMail:
		sc.Mail = func(string) error { return reply }
	case atRcpt:
		sc.Rcpt = func(string) error { return reply }
	case atData:
		sc.Data = func(testsmtp.Msg) error { return reply }
	}
	return sc
}
