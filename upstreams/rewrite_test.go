package upstreams

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync/atomic"
	"testing"
)

func editBytes(t *testing.T, raw string, e Edit) (*Message, string) {
	t.Helper()
	m := &Message{ID: "id1", From: "app@example.com", To: []string{"b@example.net"}, Body: BytesBody([]byte(raw)), MessageID: "<x@relay>"}
	out, err := EditMessage(m, e)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(out.Reader())
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != out.size() {
		t.Errorf("Size %d, read %d bytes", out.size(), len(data))
	}
	if out.ID != m.ID || out.MessageID != m.MessageID {
		t.Errorf("ids changed: %q %q", out.ID, out.MessageID)
	}
	return out, string(data)
}

func TestRewriteFrom(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, raw string
		want      []string // substrings of the result
		not       []string
	}{
		{"display name kept",
			"From: App Alerts <app@example.com>\r\nTo: b@example.net\r\n\r\nhi\r\n",
			[]string{"From: \"App Alerts\" <relay@contoso.com>\r\n", "Reply-To: App Alerts <app@example.com>\r\n", "\r\n\r\nhi\r\n"}, nil},
		{"no display name",
			"From: app@example.com\r\n\r\nhi\r\n",
			[]string{"From: relay@contoso.com\r\n", "Reply-To: app@example.com\r\n"}, nil},
		{"non-ASCII name is encoded",
			"From: Jürgen Müller <app@example.com>\r\n\r\nhi\r\n",
			[]string{"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <relay@contoso.com>\r\n"}, []string{"From: Jürgen"}},
		{"encoded name decoded and re-encoded",
			"From: =?utf-8?q?Andr=C3=A9?= <app@example.com>\r\n\r\nhi\r\n",
			[]string{"From: =?utf-8?q?Andr=C3=A9?= <relay@contoso.com>\r\n", "Reply-To: =?utf-8?q?Andr=C3=A9?= <app@example.com>\r\n"}, nil},
		{"unknown charset kept raw",
			"From: =?iso-2022-jp?B?GyRCJUYlOSVIGyhC?= <app@example.com>\r\n\r\nhi\r\n",
			[]string{"From: =?iso-2022-jp?B?GyRCJUYlOSVIGyhC?= <relay@contoso.com>\r\n"}, nil},
		{"existing Reply-To kept",
			"From: A <app@example.com>\r\nReply-To: help@example.com\r\n\r\nhi\r\n",
			[]string{"Reply-To: help@example.com\r\n"}, []string{"Reply-To: A"}},
		{"folded From becomes folded Reply-To",
			"From: A Very Long Name\r\n <app@example.com>\r\nSubject: s\r\n\r\nhi\r\n",
			[]string{"From: \"A Very Long Name\" <relay@contoso.com>\r\n", "Reply-To: A Very Long Name\r\n <app@example.com>\r\n", "Subject: s\r\n"}, nil},
		{"no From at all",
			"Subject: s\r\n\r\nhi\r\n",
			[]string{"From: relay@contoso.com\r\n", "Subject: s\r\n"}, []string{"Reply-To"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, got := editBytes(t, tc.raw, Edit{From: "relay@contoso.com"})
			if out.From != "relay@contoso.com" {
				t.Errorf("envelope from = %q", out.From)
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("missing %q in\n%s", w, got)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(got, w) {
					t.Errorf("unexpected %q in\n%s", w, got)
				}
			}
			if strings.Count(got, "\nFrom:")+strings.Count(got[:5], "From:") != 1 {
				t.Errorf("want exactly one From field:\n%s", got)
			}
		})
	}
}

func TestEditMessage_HeaderAddRemove(t *testing.T) {
	t.Parallel()
	raw := "Received: from x\r\n\tby y; Mon, 1 Jan 2026 00:00:00 +0000\r\n" +
		"From: a@example.com\r\nX-Internal: 1\r\nx-internal: 2\r\nX-Tag: old\r\n" +
		"Subject: a folded\r\n subject line\r\n\r\nbody\r\nX-Internal: not a header\r\n"
	_, got := editBytes(t, raw, Edit{Headers: HeaderEdits{
		Add:    map[string]string{"X-Tag": "relay", "X-MC-Metadata": "ünï"},
		Remove: []string{"X-INTERNAL"},
	}})
	hdr, body, _ := strings.Cut(got, "\r\n\r\n")
	hdr += "\r\n"
	if strings.Contains(strings.ToLower(hdr), "x-internal") {
		t.Errorf("X-Internal kept:\n%s", hdr)
	}
	if body != "body\r\nX-Internal: not a header\r\n" {
		t.Errorf("body changed: %q", body)
	}
	for _, w := range []string{
		"X-Tag: relay\r\n", "X-MC-Metadata: =?utf-8?q?=C3=BCn=C3=AF?=\r\n",
		"Received: from x\r\n\tby y; Mon, 1 Jan 2026 00:00:00 +0000\r\n", // folded fields keep their bytes
		"Subject: a folded\r\n subject line\r\n",
	} {
		if !strings.Contains(hdr, w) {
			t.Errorf("missing %q in\n%s", w, hdr)
		}
	}
	if strings.Contains(hdr, "X-Tag: old") {
		t.Errorf("add must replace X-Tag:\n%s", hdr)
	}
}

// A header edit of a message whose first line is not a field: all of it
// stays body, behind the new section.
func TestEditMessage_NoHeaderSection(t *testing.T) {
	t.Parallel()
	for _, raw := range []string{"just text\r\nmore\r\n", "\r\nbody only\r\n", " continuation first\r\n\r\nx\r\n", ""} {
		_, got := editBytes(t, raw, Edit{Headers: HeaderEdits{Add: map[string]string{"X-Tag": "t"}}})
		if want := "X-Tag: t\r\n\r\n" + strings.TrimPrefix(raw, "\r\n"); got != want && got != "X-Tag: t\r\n\r\n"+raw {
			t.Errorf("%q: got %q", raw, got)
		}
	}
}

func TestRedirect(t *testing.T) {
	t.Parallel()
	raw := "From: a@example.com\r\nTo: Real Person <real@example.net>,\r\n other@example.net\r\nCc: cc@example.org\r\n" +
		"Bcc: hidden@example.org\r\nX-Original-To: stale@example.com\r\nSubject: s\r\n\r\nhi\r\n"
	m := &Message{ID: "id", From: "a@example.com", To: []string{"real@example.net", "hidden@example.org"},
		AllRcpts: []string{"real@example.net", "hidden@example.org", "x@elsewhere.test"}, Body: BytesBody([]byte(raw))}
	out, err := Redirect(m, []string{"qa@example.com", "qa2@example.com"})
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(out.Reader())
	hdr, body, _ := strings.Cut(string(data), "\r\n\r\n")
	if body != "hi\r\n" {
		t.Errorf("body %q", body)
	}
	if strings.Join(out.To, ",") != "qa@example.com,qa2@example.com" || strings.Join(out.AllRcpts, ",") != "qa@example.com,qa2@example.com" {
		t.Errorf("envelope To %v AllRcpts %v", out.To, out.AllRcpts)
	}
	if strings.Join(m.To, ",") != "real@example.net,hidden@example.org" {
		t.Errorf("original message changed: %v", m.To)
	}
	want := "X-Original-To: real@example.net\r\nX-Original-To: hidden@example.org\r\n"
	if !strings.Contains(hdr, want) || !strings.Contains(hdr, "To: qa@example.com,\r\n qa2@example.com\r\n") {
		t.Errorf("header:\n%s", hdr)
	}
	for _, gone := range []string{"Cc:", "Bcc:", "real@example.net>", "other@", "stale@"} {
		if strings.Contains(hdr, gone) {
			t.Errorf("%q still in header:\n%s", gone, hdr)
		}
	}
}

// countingBody counts the bytes read from it.
type countingBody struct {
	Body
	n atomic.Int64
}

func (c *countingBody) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.Body.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// A 3 MiB attachment must not be held twice to change one header field.
func TestEditMessage_LargeBodyNotCopied(t *testing.T) {
	t.Parallel()
	var raw bytes.Buffer
	raw.WriteString("From: A <a@example.com>\r\nSubject: big\r\n\r\n")
	for i := 0; raw.Len() < 3<<20; i++ {
		raw.WriteString(strings.Repeat(string(rune('a'+i%26)), 76) + "\r\n")
	}
	src := &countingBody{Body: BytesBody(raw.Bytes())}
	out, err := EditMessage(&Message{Body: src}, Edit{From: "relay@contoso.com"})
	if err != nil {
		t.Fatal(err)
	}
	if n := src.n.Load(); n > rewriteMaxHeader {
		t.Errorf("edit read %d bytes of the original", n)
	}
	sb := out.Body.(*splicedBody)
	if len(sb.head) > 1024 {
		t.Errorf("new header section holds %d bytes", len(sb.head))
	}
	got, err := io.ReadAll(out.Reader())
	if err != nil {
		t.Fatal(err)
	}
	_, wantBody, _ := bytes.Cut(raw.Bytes(), []byte("\r\n\r\n"))
	_, gotBody, _ := bytes.Cut(got, []byte("\r\n\r\n"))
	if !bytes.Equal(gotBody, wantBody) {
		t.Errorf("body differs (got %d bytes, want %d)", len(gotBody), len(wantBody))
	}
	// Reads that straddle the splice, at odd offsets.
	for _, off := range []int64{0, int64(len(sb.head)) - 3, int64(len(sb.head)), out.size() - 5} {
		p := make([]byte, 10)
		n, err := out.Body.ReadAt(p, off)
		want := got[off:min(off+10, int64(len(got)))]
		if n != len(want) || !bytes.Equal(p[:n], want) || (n < 10 && err != io.EOF) {
			t.Errorf("ReadAt(%d) = %d %v %q, want %q", off, n, err, p[:n], want)
		}
	}
}

func TestRewrite_WrapsOnlyWhenConfigured(t *testing.T) {
	t.Parallel()
	f := Func{N: "u", F: func(context.Context, *Message) (Receipt, error) { return Receipt{}, nil }}
	if u, ok := Rewrite(f, Config{}).(Func); !ok || u.N != "u" {
		t.Errorf("Rewrite without edits = %T, want the upstream itself", u)
	}
	u := Rewrite(f, Config{RewriteFrom: "r@example.com"})
	if u.Name() != "u" {
		t.Errorf("Name = %q", u.Name())
	}
	if _, ok := u.(Closer); ok {
		t.Error("wrapper of a non-Closer is a Closer")
	}
	c := &closingUpstream{Func: f}
	if cu, ok := Rewrite(c, Config{Headers: HeaderEdits{Remove: []string{"X-A"}}}).(Closer); !ok {
		t.Error("wrapper of a Closer is not a Closer")
	} else if cu.Close(); !c.closed {
		t.Error("Close not passed through")
	}
}

type closingUpstream struct {
	Func
	closed bool
}

func (c *closingUpstream) Close() error { c.closed = true; return nil }

func TestRewrite_SendsRewrittenCopy(t *testing.T) {
	t.Parallel()
	var got *Message
	var data []byte
	f := Func{N: "u", F: func(_ context.Context, m *Message) (Receipt, error) {
		got = m
		data, _ = io.ReadAll(m.Reader())
		return Receipt{ProviderID: "p1"}, nil
	}}
	u := Rewrite(f, Config{RewriteFrom: "relay@contoso.com"})
	orig := &Message{From: "a@example.com", To: []string{"b@example.net"}, Body: BytesBody([]byte("From: a@example.com\r\n\r\nx\r\n"))}
	rc, err := u.Send(context.Background(), orig)
	if err != nil || rc.ProviderID != "p1" {
		t.Fatalf("Send = %+v, %v", rc, err)
	}
	if got.From != "relay@contoso.com" || orig.From != "a@example.com" || !strings.Contains(string(data), "From: relay@contoso.com\r\n") {
		t.Errorf("sent %q %q; original from %q", got.From, data, orig.From)
	}
}

func TestConfig_RewriteAndHeadersValidation(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"valid", func(c *Config) {
			c.RewriteFrom = "relay@contoso.com"
			c.Headers = HeaderEdits{Add: map[string]string{"X-Tag": "relay", "Reply-To": "help@example.com"}, Remove: []string{"X-Internal", "Sender", "DKIM-Signature"}}
		}, nil},
		{"rewrite_from with a name", func(c *Config) { c.RewriteFrom = "Relay <relay@contoso.com>" },
			[]string{`upstreams[2].rewrite_from: "Relay <relay@contoso.com>": use the bare address, without a display name or angle brackets`}},
		{"rewrite_from not an address", func(c *Config) { c.RewriteFrom = "relay" },
			[]string{`upstreams[2].rewrite_from: "relay": not an email address: mail: missing '@' or angle-addr`}},
		{"rewrite_from with CRLF", func(c *Config) { c.RewriteFrom = "a@b.com\r\nBcc: x@y.com" },
			[]string{`upstreams[2].rewrite_from: "a@b.com\r\nBcc: x@y.com": must not contain CR or LF`}},
		{"bad names and values", func(c *Config) {
			c.Headers = HeaderEdits{Add: map[string]string{"X Tag": "v", "X-Ok": "a\r\nBcc: x@y.com", "Message-ID": "<m@x>"},
				Remove: []string{"", "received", "X:Y", "X-Ok"}}
		}, []string{
			`upstreams[2].headers.add.Message-ID: "Message-ID" is managed by the relay and cannot be edited`,
			`upstreams[2].headers.add.X Tag: "X Tag" is not a header field name (printable ASCII without spaces or ':')`,
			`upstreams[2].headers.add.X-Ok: value must not contain CR, LF or NUL`,
			`upstreams[2].headers.remove[0]: empty header name`,
			`upstreams[2].headers.remove[1]: "received" is managed by the relay and cannot be edited`,
			`upstreams[2].headers.remove[2]: "X:Y" is not a header field name (printable ASCII without spaces or ':')`,
			`upstreams[2].headers.remove[3]: "X-Ok" is also in headers.add (add already replaces the field)`,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Name: "f", Type: "file", Dir: t.TempDir()}
			tc.edit(&c)
			c.ApplyDefaults()
			got := errStrings(c.Validate("upstreams[2]"))
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}
