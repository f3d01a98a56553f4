package relay

import (
	"bytes"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

const appMsg = "From: App Alerts <app@example.com>\r\nTo: b@example.net\r\nSubject: disk full\r\n" +
	"Date: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\nhello\r\n"

// rewriteFailover runs a failover route [a, b] where only b, a smarthost
// on 127.0.0.1, has rewrite_from (the Exchange Online mailbox case).
func rewriteFailover(t *testing.T, a *recorder) (*testRelay, *testsmtp.Server) {
	t.Helper()
	sink := testsmtp.Start(t, testsmtp.Options{})
	routes := []policy.RouteConfig{{Name: "default", Upstreams: []string{"a", "b"}, Strategy: "failover"}}
	tr := startRelay(t, []*recorder{a}, routes, func(c *Config) {
		u := upstreams.Config{Name: "b", Type: "smtp", Address: sink.Addr, TLS: "none", Timeout: 5 * time.Second,
			RewriteFrom: "relay@contoso.com"}
		u.ApplyDefaults()
		c.Upstreams = append(c.Upstreams, u)
	})
	if err := tr.send("app@example.com", []string{"b@example.net"}, appMsg); err != nil {
		t.Fatal(err)
	}
	return tr, sink
}

// Exchange Online refused the first upstream's sender (554 5.2.252
// SendAsDenied would be a SenderRejected; a 421 here): the failover
// partner sends as its own mailbox, the recipient can still reply.
func TestDelivery_RewriteFromOnlyOnFailoverUpstream(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a", errs: []error{uerr(upstreams.Transient, "421 try later")}}
	tr, sink := rewriteFailover(t, a)
	waitFor(t, "delivery through b", func() bool { return sink.Count() == 1 && tr.queue.len() == 0 })
	m := sink.Messages()[0]
	if m.From != "relay@contoso.com" || !slices.Equal(m.To, []string{"b@example.net"}) {
		t.Errorf("envelope %s %v", m.From, m.To)
	}
	data := string(m.Data)
	for _, want := range []string{
		"\r\nFrom: \"App Alerts\" <relay@contoso.com>\r\n",
		"\r\nReply-To: App Alerts <app@example.com>\r\n",
		"\r\nMessage-ID: <m1@example.com>\r\n", "\r\n\r\nhello\r\n",
	} {
		if !strings.Contains("\r\n"+data, want) {
			t.Errorf("missing %q in\n%s", want, data)
		}
	}
	if strings.Count(data, "From:") != 1 {
		t.Errorf("want one From field:\n%s", data)
	}
	if a.calls() != 1 {
		t.Errorf("a called %d times", a.calls())
	}
}

// When the first upstream takes the message, nothing of b's rewrite leaks
// into its copy.
func TestDelivery_RewriteFromNotAppliedToOtherUpstreams(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr, sink := rewriteFailover(t, a)
	waitFor(t, "delivery through a", func() bool { return len(a.accepted()) == 1 && tr.queue.len() == 0 })
	got := a.accepted()[0]
	if got.From != "app@example.com" {
		t.Errorf("envelope sender %q", got.From)
	}
	// The relay prepends its Received field; the rest is the client's bytes.
	if !strings.HasSuffix(string(got.Data), "\r\n"+appMsg) || strings.Contains(string(got.Data), "Reply-To") {
		t.Errorf("a got modified bytes:\n%s", got.Data)
	}
	if sink.Count() != 0 {
		t.Errorf("b got %d messages", sink.Count())
	}
}

func TestDelivery_HeaderEditsOnDeliveredBytes(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) {
		c.Upstreams[0].Headers = upstreams.HeaderEdits{Add: map[string]string{"X-Tag": "relay"}, Remove: []string{"x-internal"}}
	})
	msg := "From: a@example.com\r\nTo: b@example.net\r\nX-Internal: secret\r\nX-Tag: app\r\nX-INTERNAL: two\r\nSubject: s\r\n\r\nX-Internal: body line\r\n"
	if err := tr.send("a@example.com", []string{"b@example.net"}, msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	data := string(a.accepted()[0].Data)
	hdr, body, _ := strings.Cut(data, "\r\n\r\n")
	if strings.Contains(strings.ToLower(hdr), "x-internal") || strings.Count(hdr, "X-Tag:") != 1 || !strings.Contains(hdr, "X-Tag: relay") {
		t.Errorf("header:\n%s", hdr)
	}
	if body != "X-Internal: body line\r\n" {
		t.Errorf("body %q", body)
	}
}

// A staging route: the QA mailbox gets the mail, the real people named
// in it get nothing, not even through an upstream that mails every header
// recipient. The message also has a production recipient whose upstream
// rejects it, so the dead letter shows what the staging route recorded.
func TestDelivery_RedirectAllTo(t *testing.T) {
	t.Parallel()
	stg := &recorder{name: "stg"}
	prod := &recorder{name: "prod", errs: []error{uerr(upstreams.Rejected, "550 no such user")}}
	routes := []policy.RouteConfig{
		{Name: "staging", Match: &policy.Match{RecipientDomains: []string{"example.net"}}, Upstreams: []string{"stg"},
			RedirectAllTo: []string{"qa@example.com", "qa2@example.com"}},
		{Name: "default", Upstreams: []string{"prod"}},
	}
	tr := startRelay(t, []*recorder{stg, prod}, routes, nil)
	msg := "From: a@example.com\r\nTo: Real <real@example.net>, other@example.net\r\nCc: boss@example.net\r\n" +
		"Bcc: hidden@example.net\r\nSubject: s\r\n\r\nhi\r\n"
	rcpts := []string{"real@example.net", "hidden@example.net", "boss@example.net", "p@example.org"}
	if err := tr.send("a@example.com", rcpts, msg); err != nil {
		t.Fatal(err)
	}
	tr.waitDead(t, 1)
	got := stg.accepted()
	if len(got) != 1 {
		t.Fatalf("staging upstream got %d messages", len(got))
	}
	if !slices.Equal(got[0].To, []string{"qa@example.com", "qa2@example.com"}) || !slices.Equal(got[0].AllRcpts, got[0].To) {
		t.Errorf("envelope To %v AllRcpts %v", got[0].To, got[0].AllRcpts)
	}
	hdr, body, _ := strings.Cut(string(got[0].Data), "\r\n\r\n")
	hdr += "\r\n"
	for _, want := range []string{
		"X-Original-To: real@example.net\r\nX-Original-To: hidden@example.net\r\nX-Original-To: boss@example.net\r\n",
		"\r\nTo: qa@example.com,\r\n qa2@example.com\r\n",
	} {
		if !strings.Contains("\r\n"+hdr, want) {
			t.Errorf("missing %q in\n%s", want, hdr)
		}
	}
	for _, gone := range []string{"Cc:", "Bcc:", "Real <", "other@", "p@example.org"} {
		if strings.Contains(hdr, gone) {
			t.Errorf("%q left in\n%s", gone, hdr)
		}
	}
	if body != "hi\r\n" {
		t.Errorf("body %q", body)
	}
	d := tr.deadEnvelopes(t)[0]
	if len(d.Deliveries) != 1 || d.Deliveries[0].Route != "staging" ||
		!slices.Equal(d.Deliveries[0].Rcpts, []string{"real@example.net", "hidden@example.net", "boss@example.net"}) {
		t.Errorf("deliveries = %+v", d.Deliveries)
	}
	if len(d.Failures) != 1 || !slices.Equal(d.Failures[0].Rcpts, []string{"p@example.org"}) {
		t.Errorf("failures = %+v", d.Failures)
	}
}

// Staging mail is all or nothing: an upstream that took only part of the
// redirect list failed the attempt, and the next upstream delivers it
// whole; a rejected redirect address dead-letters every original.
func TestDelivery_RedirectPartialIsAllOrNothing(t *testing.T) {
	t.Parallel()
	refuse := func(c upstreams.Class) error {
		return partial{ProviderID: "a-partial", Refused: []upstreams.Refusal{{Rcpt: "qa2@example.com",
			Err: &upstreams.Error{Upstream: "a", Class: c, Reason: "refused qa2"}}}}
	}
	routes := func(names ...string) []policy.RouteConfig {
		return []policy.RouteConfig{{Name: "staging", Upstreams: names, RedirectAllTo: []string{"qa@example.com", "qa2@example.com"}}}
	}
	rcpts := []string{"r1@example.net", "r2@example.net"}

	t.Run("transient", func(t *testing.T) {
		a := &recorder{name: "a", errs: []error{refuse(upstreams.Transient)}}
		b := &recorder{name: "b"}
		tr := startRelay(t, []*recorder{a, b}, routes("a", "b"), nil)
		if err := tr.send("a@example.com", rcpts, simpleMsg); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "delivery through b", func() bool {
			envs, _ := tr.spool.List()
			return len(b.accepted()) == 1 && len(envs) == 0 && tr.queue.len() == 0
		})
		if got := b.accepted()[0].To; !slices.Equal(got, []string{"qa@example.com", "qa2@example.com"}) || a.calls() != 1 {
			t.Errorf("b delivered to %v; a called %d times", got, a.calls())
		}
		if n := len(tr.deadEnvelopes(t)); n != 0 {
			t.Errorf("%d dead letters", n)
		}
	})
	t.Run("rejected", func(t *testing.T) {
		a := &recorder{name: "a", errs: []error{refuse(upstreams.Rejected)}}
		tr := startRelay(t, []*recorder{a}, routes("a"), nil)
		if err := tr.send("a@example.com", rcpts, simpleMsg); err != nil {
			t.Fatal(err)
		}
		tr.waitDead(t, 1)
		d := tr.deadEnvelopes(t)[0]
		if len(d.Deliveries) != 0 || len(d.Failures) != 1 || !slices.Equal(d.Failures[0].Rcpts, rcpts) ||
			!strings.Contains(d.Failures[0].Reason, "refused qa2") {
			t.Errorf("deliveries %+v failures %+v", d.Deliveries, d.Failures)
		}
	})
}

// An operator must see at start that a route sends nothing to its real
// recipients.
func TestNew_LogsRedirectingRoutes(t *testing.T) {
	t.Parallel()
	cfg := Default()
	cfg.Spool.Dir = filepath.Join(t.TempDir(), "spool")
	u := upstreams.Config{Name: "a", Type: "file", Dir: t.TempDir()}
	u.ApplyDefaults()
	cfg.Upstreams = []upstreams.Config{u}
	cfg.Routes = []policy.RouteConfig{{Name: "staging", Upstreams: []string{"a"}, RedirectAllTo: []string{"qa@example.com"}}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := New(&cfg, Deps{Logger: slog.New(slog.NewTextHandler(&buf, nil))}); err != nil {
		t.Fatal(err)
	}
	want := `level=WARN msg="route redirects all mail (redirect_all_to)" route=staging redirect_all_to=[qa@example.com]`
	if !strings.Contains(buf.String(), want) {
		t.Errorf("log:\n%s\nwant a line with %s", buf.String(), want)
	}
}
