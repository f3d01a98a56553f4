package relay

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// hasBareCRLF and normalizeCRLF run the intake's stream filter over b,
// one byte per read, so every byte is also a read boundary.
func hasBareCRLF(b []byte) bool {
	_, err := io.ReadAll(newCRLFReader(iotest.OneByteReader(bytes.NewReader(b)), false))
	return errors.Is(err, errBareLF)
}

func normalizeCRLF(b []byte) []byte {
	out, err := io.ReadAll(newCRLFReader(iotest.OneByteReader(bytes.NewReader(b)), true))
	if err != nil {
		panic(err)
	}
	return out
}

// The streaming header reader ends the header section where mailhdr.Split
// does, so prepare on what it read gives the bytes prepare gives on the
// whole message.
func TestReadHeaderSection_MatchesWholeMessage(t *testing.T) {
	for _, raw := range []string{
		"Subject: a\r\nX-Relay-Route: m\r\n\r\nbody\r\n",
		"From sender@example.com Mon Jan 1\r\nSubject: mbox\r\n\r\nbody\r\n",
		"Subject: x\r\nthis line is no field\r\nTo: y\r\n\r\nrest\r\n",
		" continuation first\r\nSubject: y\r\n\r\n",
		"Subject: folded\r\n\tsecond\r\n\r\n",
		"Subject: only headers\r\n",
		"just a body line\r\nsecond\r\n",
		"\r\nbody after empty header\r\n",
		"",
	} {
		want, err := prepare([]byte(raw), ri)
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReaderSize(iotest.HalfReader(strings.NewReader(raw)), 16)
		hdr, err := readHeaderSection(br, maxHeaderBytes)
		if err != nil {
			t.Fatalf("%q: %v", raw, err)
		}
		got, err := prepare(hdr, ri)
		if err != nil {
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(br)
		if all := string(got.data) + string(rest); all != string(want.data) {
			t.Errorf("%q:\nstreamed %q\nwhole    %q", raw, all, want.data)
		}
	}
	big := "Subject: x\r\nX-Long: " + strings.Repeat("y", maxHeaderBytes) + "\r\n\r\n"
	if _, err := readHeaderSection(bufio.NewReader(strings.NewReader(big)), maxHeaderBytes); !errors.Is(err, errHeaderTooLong) {
		t.Errorf("header section over the limit: %v, want errHeaderTooLong", err)
	}
}

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
	h := p.routingHeader(true)
	if h("X-Relay-Route") != "marketing" || h("X-Relay-Priority") != "high" || h("To") != "b@example.net" {
		t.Errorf("trusted routing view lost headers")
	}
	if p.header.Get("X-Relay-Route") != "" {
		t.Errorf("delivered header keeps X-Relay-Route")
	}
}

// listen.trusted_networks: an untrusted client's X-Relay-* headers are
// removed as ever but read as absent for routing; other headers route.
func TestPrepare_UntrustedRoutingIgnoresRelayHeaders(t *testing.T) {
	raw := "From: a@example.com\r\nX-Relay-Route: marketing\r\nX-Mailer: app\r\n\r\nbody\r\n"
	p, err := prepare([]byte(raw), ri)
	if err != nil {
		t.Fatal(err)
	}
	h := p.routingHeader(false)
	if v := h("X-Relay-Route"); v != "" {
		t.Errorf("untrusted X-Relay-Route = %q, want it ignored", v)
	}
	if v := h("x-relay-route"); v != "" {
		t.Errorf("untrusted x-relay-route = %q, want it ignored", v)
	}
	if v := h("X-Mailer"); v != "app" {
		t.Errorf("X-Mailer = %q: non-X-Relay headers still route", v)
	}
	if strings.Contains(string(p.data), "X-Relay-") {
		t.Errorf("X-Relay header delivered: %q", p.data)
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
		io.Copy(io.Discard, newCRLFReader(bytes.NewReader(raw), false))
		prepare(raw, ri)
	}
}

// Real-world sloppy input: the header section ends at the first line that
// is not a field, and X-Relay-* headers above it are still removed.
func TestPrepare_MalformedHeaderSection(t *testing.T) {
	for _, tc := range []struct {
		name, raw, wantBody string
		wantHdr             []string
	}{
		{"no blank line before body", "Subject: hi\r\nX-Relay-Route: m\r\nHello there\r\nbye\r\n", "\r\nHello there\r\nbye\r\n", []string{"Subject: hi"}},
		{"bad header line", "Subject: hi\r\nX-Relay-Route: m\r\nX Bad: 1\r\n\r\nbody\r\n", "\r\nX Bad: 1\r\n\r\nbody\r\n", []string{"Subject: hi"}},
		{"mbox From line", "From app@example.com Sun Nov 22 10:00:00 2026\r\nSubject: hi\r\nX-Relay-Route: m\r\n\r\nbody\r\n", "\r\nbody\r\n", []string{"Subject: hi"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := prepare([]byte(tc.raw), ri)
			if err != nil {
				t.Fatal(err)
			}
			out := string(p.data)
			if strings.Contains(out, "X-Relay-Route") {
				t.Errorf("X-Relay header leaked: %q", out)
			}
			if p.routingHeader(true)("X-Relay-Route") != "m" {
				t.Errorf("routing lost the X-Relay header")
			}
			head, body, _ := strings.Cut(out, "\r\n\r\n")
			for _, h := range tc.wantHdr {
				if !strings.Contains(head, h) {
					t.Errorf("header section lacks %q: %q", h, head)
				}
			}
			if "\r\n"+body != tc.wantBody {
				t.Errorf("body = %q, want %q", "\r\n"+body, tc.wantBody)
			}
		})
	}
}

func TestValidAddress(t *testing.T) {
	for a, want := range map[string]bool{
		"user@example.com":                      true,
		"first.last+tag@sub.example.co.uk":      true,
		"\"quoted user\"@example.com":           true,
		"josé@exemple.fr":                       true,
		"用户@例子.广告":                              true,
		"not an address":                        false,
		"a@b\rBcc: victim@evil.example":         false,
		"\"é\rBcc: victim@evil.example\"@x.net": false,
		"é\x00@x.net":                           false,
		"bad\xff@x.net":                         false,
	} {
		if got := validAddress(a); got != want {
			t.Errorf("validAddress(%q) = %v, want %v", a, got, want)
		}
	}
}

// The stream check agrees with a byte-by-byte reference on random input
// cut at random read boundaries.
func TestCRLFReader_MatchesByteLoop(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	naive := func(b []byte) bool {
		for i, c := range b {
			if c == '\r' && (i+1 >= len(b) || b[i+1] != '\n') {
				return true
			}
			if c == '\n' && (i == 0 || b[i-1] != '\r') {
				return true
			}
		}
		return false
	}
	for n := range 5000 {
		b := make([]byte, rnd.IntN(40))
		for i := range b {
			b[i] = "ab\r\n\r\n"[rnd.IntN(6)]
		}
		var src io.Reader = bytes.NewReader(b)
		if n%2 == 0 {
			src = iotest.OneByteReader(src)
		}
		r := newCRLFReader(src, false)
		_, err := io.ReadAll(r)
		if got := errors.Is(err, errBareLF); got != naive(b) {
			t.Fatalf("%q: bare = %v, want %v", b, got, naive(b))
		}
	}
}
