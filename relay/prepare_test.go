package relay

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestHasBareCRLF(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{"Subject: x\r\n\r\nbody\r\n", false},
		{"", false},
		{"no newline at all", false},
		{"a\r\nb\r\n\r\n", false},
		{"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n", true}, // smuggling with bare LF
		{"Subject: x\r\n\r\nhello\r\n.\r", true},
		{"hello\r.\r\n", true},
		{"a\n", true},
		{"\nstart", true},
		{"end\r", true},
		{"a\r\r\n", true},
	} {
		if got := hasBareCRLF([]byte(tc.in)); got != tc.want {
			t.Errorf("hasBareCRLF(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestNormalizeCRLF(t *testing.T) {
	in := "a\nb\r\nc\rd\r\n\n"
	want := "a\r\nb\r\nc\r\nd\r\n\r\n"
	if got := string(normalizeCRLF([]byte(in))); got != want {
		t.Errorf("normalizeCRLF = %q, want %q", got, want)
	}
	if hasBareCRLF(normalizeCRLF([]byte(in))) {
		t.Error("normalized output still has bare CR/LF")
	}
}

var ri = receivedInfo{helo: "app.local", remote: "127.0.0.1", hostname: "relay.test", id: "abc123", with: "ESMTP",
	at: time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}

func TestPrepare_KeepsBytesAddsTraceAndMessageID(t *testing.T) {
	raw := "From: A <a@example.com>\r\nX-Relay-Route: marketing\r\nTo: b@example.net\r\nx-relay-priority: high\r\n" +
		"Subject: =?UTF-8?Q?caf=C3=A9?=\r\n folded continuation\r\n\r\nBody line 1\r\n\r\nX-Relay-Route: in body stays\r\n"
	p, err := prepare([]byte(raw), ri)
	if err != nil {
		t.Fatal(err)
	}
	out := string(p.data)
	wantHead := "Received: from app.local ([127.0.0.1])\r\n\tby relay.test (relaycar) with ESMTP id abc123;\r\n\tSun, 22 Nov 2026 10:00:00 +0000\r\n" +
		"Message-Id: <abc123@relay.test>\r\n"
	if !strings.HasPrefix(out, wantHead) {
		t.Errorf("head:\n%q\nwant prefix\n%q", out, wantHead)
	}
	rest := strings.TrimPrefix(out, wantHead)
	wantRest := "From: A <a@example.com>\r\nTo: b@example.net\r\nSubject: =?UTF-8?Q?caf=C3=A9?=\r\n folded continuation\r\n\r\nBody line 1\r\n\r\nX-Relay-Route: in body stays\r\n"
	if rest != wantRest {
		t.Errorf("rest:\n%q\nwant\n%q", rest, wantRest)
	}
	if p.messageID != "<abc123@relay.test>" {
		t.Errorf("messageID = %q", p.messageID)
	}
	if p.header.Get("X-Relay-Route") != "marketing" || p.header.Get("X-Relay-Priority") != "high" {
		t.Errorf("routing view lost X-Relay headers")
	}
}

func TestPrepare_ExistingMessageIDKept(t *testing.T) {
	raw := "Message-ID: <orig@app>\r\nSubject: x\r\n\r\nbody\r\n"
	p, _ := prepare([]byte(raw), ri)
	if p.messageID != "<orig@app>" || bytes.Count(p.data, []byte("Message-")) != 1 {
		t.Errorf("messageID = %q, data %q", p.messageID, p.data)
	}
}

// `echo hi | sendmail` style input with no header block: all body, as
// Postfix's cleanup treats it.
func TestPrepare_NoHeader(t *testing.T) {
	for _, raw := range []string{"just a body line\r\nsecond\r\n", "\r\nbody after empty header\r\n", "Subject: only headers\r\n"} {
		p, err := prepare([]byte(raw), ri)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(p.data, []byte("Message-Id: <abc123@relay.test>\r\n")) {
			t.Errorf("%q: no Message-Id in %q", raw, p.data)
		}
		if hasBareCRLF(p.data) {
			t.Errorf("%q: output has bare CR/LF: %q", raw, p.data)
		}
		body := strings.TrimPrefix(raw, "\r\n")
		if !strings.Contains(string(p.data), body) {
			t.Errorf("%q: content lost: %q", raw, p.data)
		}
	}
}

func TestSanitizeHELO(t *testing.T) {
	if got := sanitize("evil\r\nBcc: x (y)"); got != "evilBcc:xy" {
		t.Errorf("sanitize = %q", got)
	}
	if sanitize("") != "unknown" {
		t.Error("empty HELO")
	}
}

func BenchmarkPrepare2KB(b *testing.B) {
	raw := []byte("From: a@example.com\r\nTo: b@example.net\r\nSubject: load\r\nMessage-ID: <x@y>\r\n\r\n" + strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 30))
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		hasBareCRLF(raw)
		prepare(raw, ri)
	}
}
