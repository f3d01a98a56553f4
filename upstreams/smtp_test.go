package upstreams

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

func newTestSMTP(t *testing.T, c Config) *smtpUpstream {
	t.Helper()
	c.Name, c.Type = "smarthost", "smtp"
	if c.TLS == "" {
		c.TLS = "none"
	}
	c.ApplyDefaults()
	if c.Timeout == 30*time.Second {
		c.Timeout = 2 * time.Second
	}
	if errs := c.Validate("upstreams[0]"); len(errs) > 0 {
		t.Fatal(errs)
	}
	u, err := New(c, Deps{Hostname: "relay.test"})
	if err != nil {
		t.Fatal(err)
	}
	return u.(*smtpUpstream)
}

var testMsg = &Message{ID: "id1", From: "a@example.com", To: []string{"b@example.net", "c@example.org"},
	Body: BytesBody([]byte("Subject: hi\r\nMessage-Id: <m1@x>\r\n\r\nline\r\n.leading dot\r\n")), MessageID: "<m1@x>"}

func TestSMTP_DeliversExactBytesAndEnvelope(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	rc, err := u.Send(context.Background(), testMsg)
	id := rc.ProviderID
	if err != nil {
		t.Fatal(err)
	}
	got := sink.Messages()
	if len(got) != 1 {
		t.Fatalf("sink has %d messages", len(got))
	}
	if got[0].From != testMsg.From || !slices.Equal(got[0].To, testMsg.To) {
		t.Errorf("envelope %s %v", got[0].From, got[0].To)
	}
	if !bytes.Equal(got[0].Data, bodyOf(testMsg)) {
		t.Errorf("data %q, want %q", got[0].Data, bodyOf(testMsg))
	}
	if id == "" {
		t.Error("no id from the DATA reply")
	}
}

func TestSMTP_StartTLSAndAuth(t *testing.T) {
	cert := testsmtp.NewCert(t)
	sink := testsmtp.Start(t, testsmtp.Options{TLS: cert.Config, Users: map[string]string{"relay": "pw"}})
	u := newTestSMTP(t, Config{Address: sink.Addr, TLS: "starttls", CAFile: cert.CertFile, Username: "relay", Password: "pw"})
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	if m := sink.Messages()[0]; !m.TLS || m.User != "relay" {
		t.Errorf("tls=%v user=%q", m.TLS, m.User)
	}
	// Wrong password: the provider's fault, not the message's.
	u = newTestSMTP(t, Config{Address: sink.Addr, TLS: "starttls", CAFile: cert.CertFile, Username: "relay", Password: "bad"})
	_, err := u.Send(context.Background(), testMsg)
	if ClassOf(err) != ProviderFault || !strings.Contains(err.Error(), "535") {
		t.Errorf("bad password: %v", err)
	}
	if strings.Contains(err.Error(), "bad") && strings.Contains(err.Error(), "password: bad") {
		t.Errorf("password leaked: %v", err)
	}
	// Untrusted certificate: no delivery.
	u = newTestSMTP(t, Config{Address: sink.Addr, TLS: "starttls"})
	if _, err := u.Send(context.Background(), testMsg); err == nil {
		t.Error("delivered over TLS to an untrusted certificate")
	}
}

func TestSMTP_ImplicitTLS(t *testing.T) {
	cert := testsmtp.NewCert(t)
	sink := testsmtp.Start(t, testsmtp.Options{TLS: cert.Config, Implicit: true})
	u := newTestSMTP(t, Config{Address: sink.Addr, TLS: "implicit", CAFile: cert.CertFile})
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	if !sink.Messages()[0].TLS {
		t.Error("not over TLS")
	}
}

// A peer that stops offering STARTTLS (misconfiguration or a downgrade
// attack) must not get the mail in plaintext.
func TestSMTP_NoPlaintextFallback(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr, TLS: "starttls", Username: "relay", Password: "pw"})
	_, err := u.Send(context.Background(), testMsg)
	if ClassOf(err) != ProviderFault || !strings.Contains(err.Error(), "STARTTLS") {
		t.Errorf("got %v, want provider_fault about STARTTLS", err)
	}
	if sink.Count() != 0 {
		t.Error("message sent in plaintext")
	}
}

func TestSMTP_ReplyClassification(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	for _, tc := range []struct {
		at    string
		code  int
		enh   string
		class Class
		msg   string // "scripted" if empty
	}{
		{atMail, 421, "4.3.2", Transient, ""},
		{atMail, 451, "4.3.0", Transient, ""},
		{atMail, 530, "5.7.0", ProviderFault, ""},
		{atMail, 550, "5.7.1", SenderRejected, ""}, // relay denied for this sender
		{atMail, 553, "5.1.8", SenderRejected, ""},
		{atMail, 552, "5.3.4", Unsupported, ""}, // SIZE: too big for this server, not a bad message
		{atRcpt, 450, "4.2.1", Transient, ""},
		{atRcpt, 452, "4.5.3", Transient, ""},
		{atRcpt, 550, "5.1.1", Rejected, ""},
		{atRcpt, 552, "5.5.3", Transient, ""}, // RFC 5321 4.5.3.1.10
		{atRcpt, 553, "5.1.3", Rejected, ""},
		{atRcpt, 530, "5.7.0", ProviderFault, ""},
		{atData, 451, "4.7.1", Transient, ""},
		{atData, 421, "4.4.2", Transient, ""},
		{atData, 550, "5.7.1", Rejected, ""},
		{atData, 552, "5.3.4", Unsupported, ""},
		{atData, 554, "5.6.0", Rejected, ""},
		// This server's limits for this message, not the message's fault:
		// another upstream may carry it.
		{atData, 552, "", Unsupported, ""},      // "exceeded storage allocation", RFC 1870's size reply
		{atData, 552, "5.2.2", Rejected, ""},    // mailbox full
		{atData, 554, "5.6.3", Unsupported, ""}, // conversion required (8-bit to a 7-bit server)
		{atData, 554, "5.6.9", Unsupported, ""}, // UTF-8 headers, no SMTPUTF8 downstream
		{atRcpt, 553, "5.6.7", Unsupported, ""}, // non-ASCII address not permitted
		{atMail, 552, "5.7.1", SenderRejected, ""},
		// After MAIL, refusals of the sender or of this client, not of the
		// message: fail over rather than dead-letter.
		{atData, 554, "5.2.252", SenderRejected, "SendAsDenied; relay@contoso.com not allowed to send as app@contoso.com"},
		{atData, 550, "5.7.60", SenderRejected, "SMTP; Client does not have permissions to send as this sender"},
		{atRcpt, 554, "5.7.1", ProviderFault, "<b@example.net>: Relay access denied"},
		{atRcpt, 550, "5.7.57", ProviderFault, "Client not authenticated to send mail"},
		{atRcpt, 550, "5.7.708", ProviderFault, "Access denied, traffic not accepted from this IP"},
		// A policy refusal of this recipient or this content stays a rejection.
		{atRcpt, 554, "5.7.1", Rejected, "<b@example.net>: Recipient address rejected: Access denied"},
		{atData, 550, "5.7.1", Rejected, "Message rejected as spam"},
	} {
		name := fmt.Sprintf("%d-%s-at-%s", tc.code, tc.enh, tc.at)
		if tc.msg == "" {
			tc.msg = "scripted"
		} else {
			name += "-" + strings.Fields(tc.msg)[0]
		}
		t.Run(name, func(t *testing.T) {
			sink.SetScript(replyAt(tc.at, testsmtp.Reply(tc.code, tc.enh, tc.msg)))
			_, err := u.Send(context.Background(), testMsg)
			if got := ClassOf(err); got != tc.class {
				t.Errorf("class = %v, want %v (err %v)", got, tc.class, err)
			}
			var e *Error
			if !errors.As(err, &e) || !strings.HasPrefix(e.Code, fmt.Sprint(tc.code)) {
				t.Errorf("code = %+v", err)
			}
		})
	}
}

func TestSMTP_ConnectionErrorsAreTransient(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	addr := sink.Addr
	sink.Stop()
	u := newTestSMTP(t, Config{Address: addr})
	if _, err := u.Send(context.Background(), testMsg); ClassOf(err) != Transient {
		t.Errorf("down upstream: %v", err)
	}
}

// The upstream took the whole message and went silent: it may have queued
// it, so this must not be treated like a plain transient failure.
func TestSMTP_TimeoutAfterDataIsAmbiguous(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{DataDelay: 3 * time.Second})
	u := newTestSMTP(t, Config{Address: sink.Addr, Timeout: 500 * time.Millisecond})
	start := time.Now()
	_, err := u.Send(context.Background(), testMsg)
	if ClassOf(err) != Ambiguous {
		t.Errorf("got %v, want ambiguous", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("Send took %v, timeout is 500ms", time.Since(start))
	}
}

func TestSMTP_PartialRecipients(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{Rcpt: func(to string) error {
		if strings.HasPrefix(to, "c@") {
			return testsmtp.Reply(550, "5.1.1", "no such user")
		}
		return nil
	}})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	rc, err := u.Send(context.Background(), testMsg)
	if e := refusedErr(t, rc, err); e.Class != Rejected || !slices.Equal(rc.RefusedRcpts(), []string{"c@example.org"}) || rc.ProviderID == "" {
		t.Fatalf("got %+v", rc)
	}
	if m := sink.Messages(); len(m) != 1 || !slices.Equal(m[0].To, []string{"b@example.net"}) {
		t.Errorf("sink got %+v", m)
	}
}

// Refused recipients beside accepted ones are each classed by their own
// reply: a user unknown stays rejected (no failover for it), while a
// relay_domains "relay access denied" for one domain is about that
// recipient at this server (another upstream may carry it) and must not
// open the breaker of a smarthost that has just taken the others.
func TestSMTP_PartialRecipientsEachByItsOwnReply(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{Rcpt: func(to string) error {
		switch {
		case strings.HasPrefix(to, "ext@"):
			return testsmtp.Reply(554, "5.7.1", "<"+to+">: Relay access denied")
		case strings.HasPrefix(to, "nouser@"):
			return testsmtp.Reply(550, "5.1.1", "<"+to+">: User unknown")
		}
		return nil
	}})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	m := *testMsg
	m.To = []string{"ok@example.net", "ext@elsewhere.example", "nouser@example.net"}
	rc, err := u.Send(context.Background(), &m)
	if err != nil {
		t.Fatal(err)
	}
	classes := map[string]Class{}
	for _, f := range rc.Refused {
		classes[f.Rcpt] = f.Err.Class
	}
	if len(classes) != 2 || classes["ext@elsewhere.example"] != Unsupported || classes["nouser@example.net"] != Rejected {
		t.Errorf("refused = %v, want ext@ unsupported and nouser@ rejected", classes)
	}
	if w := rc.Worst(); w == nil || w.Class == ProviderFault {
		t.Errorf("worst refusal %v: the breaker would open for a server that took the message", w)
	}
	if msgs := sink.Messages(); len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"ok@example.net"}) {
		t.Errorf("sink got %+v", msgs)
	}
}

func TestSMTP_SecretNotLeaked(t *testing.T) {
	const pw = "pw-9f8e7d6c5b4a"
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	cert := testsmtp.NewCert(t)
	sink := testsmtp.Start(t, testsmtp.Options{TLS: cert.Config, Users: map[string]string{"relay": "other"}})
	u := newTestSMTP(t, Config{Address: sink.Addr, TLS: "starttls", CAFile: cert.CertFile, Username: "relay", Password: Secret(pw)})
	_, err := u.Send(context.Background(), testMsg)
	log.Error("delivery failed", "err", err, "password", u.password)
	if err == nil || strings.Contains(err.Error(), pw) || strings.Contains(logs.String(), pw) {
		t.Errorf("password leaked or no error: %v / %s", err, logs.String())
	}
}

func TestFile_WritesEmlAndEnvelope(t *testing.T) {
	dir := t.TempDir()
	u, err := New(Config{Name: "out", Type: "file", Dir: dir}, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	eml, _ := readFile(dir + "/id1.eml")
	js, _ := readFile(dir + "/id1.json")
	if !bytes.Equal(eml, bodyOf(testMsg)) || !bytes.Contains(js, []byte(`"b@example.net"`)) {
		t.Errorf("eml %q json %s", eml, js)
	}
}

func readFile(p string) ([]byte, error) { return os.ReadFile(p) }

func TestSMTP_AllRecipientsRefusedPrefersTemporary(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sink.SetScript(testsmtp.Script{Rcpt: func(to string) error {
		if strings.HasPrefix(to, "b@") {
			return testsmtp.Reply(550, "5.1.1", "no such user")
		}
		return testsmtp.Reply(451, "4.7.1", "greylisted")
	}})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	if _, err := u.Send(context.Background(), testMsg); ClassOf(err) != Transient {
		t.Errorf("550 then 451: %v, want transient (retry both)", err)
	}
}

func TestSMTP_ReusesIdleConnections(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	for range 5 {
		if _, err := u.Send(context.Background(), testMsg); err != nil {
			t.Fatal(err)
		}
	}
	if sink.Count() != 5 || sink.Conns() != 1 {
		t.Errorf("%d messages over %d connections, want 5 over 1", sink.Count(), sink.Conns())
	}
	u.Close()
	if _, err := u.Send(context.Background(), testMsg); err != nil || sink.Conns() != 2 {
		t.Errorf("after Close: %v, %d connections", err, sink.Conns())
	}
}

// As many connections stay idle as deliveries may run at once: with fewer,
// every burst of spool.workers deliveries closed some and dialled them again.
func TestSMTP_KeepsOneIdleConnectionPerDelivery(t *testing.T) {
	for _, tc := range []struct{ deliveries, want int }{{12, 12}, {0, 12 + 12 - smtpMinIdle}} {
		sink := testsmtp.Start(t, testsmtp.Options{})
		sink.SetScript(testsmtp.Script{DataDelay: 100 * time.Millisecond}) // the 12 overlap
		c := Config{Name: "smarthost", Type: "smtp", Address: sink.Addr, TLS: "none"}
		c.ApplyDefaults()
		u, err := New(c, Deps{Hostname: "relay.test", Deliveries: tc.deliveries})
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			var wg sync.WaitGroup
			for range 12 {
				wg.Go(func() {
					if _, err := u.Send(context.Background(), testMsg); err != nil {
						t.Error(err)
					}
				})
			}
			wg.Wait()
		}
		u.(*smtpUpstream).Close()
		if sink.Count() != 24 || sink.Conns() != tc.want {
			t.Errorf("Deliveries %d: %d messages over %d connections, want 24 over %d", tc.deliveries, sink.Count(), sink.Conns(), tc.want)
		}
	}
}

// The smarthost restarted (or timed out our idle connection): the next
// message must go through on a fresh connection, not count as a failure.
func TestSMTP_StaleIdleConnectionIsRetried(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	sink.Stop()
	sink.Restart()
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatalf("send after the upstream restarted: %v", err)
	}
	if sink.Count() != 2 {
		t.Errorf("sink has %d messages", sink.Count())
	}
}

// A failed transaction never leaves its connection for the next message.
func TestSMTP_FailedTransactionIsNotReused(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	sink.SetScript(testsmtp.Script{Data: func(testsmtp.Msg) error { return testsmtp.Reply(554, "5.6.0", "no") }})
	u.Send(context.Background(), testMsg)
	sink.SetScript(testsmtp.Script{})
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	if sink.Conns() != 2 {
		t.Errorf("%d connections, want a fresh one after the failure", sink.Conns())
	}
}

// Models the hardening issue's outage: UTF-8 envelopes sent to a smarthost
// without SMTPUTF8 failed with go-smtp's plain error, counted as transient
// and opened the only upstream's breaker. The check happens after EHLO and
// before MAIL, and the connection stays usable.
func TestSMTP_UTF8EnvelopeWithoutSMTPUTF8IsUnsupported(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{}) // go-smtp without EnableSMTPUTF8
	mails := 0
	sink.SetScript(testsmtp.Script{Mail: func(string) error { mails++; return nil }})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	for _, m := range []*Message{
		{ID: "u1", From: "a@example.com", To: []string{"jörg@example.net"}, Body: testMsg.Body},
		{ID: "u2", From: "jörg@example.com", To: []string{"b@example.net"}, Body: testMsg.Body},
	} {
		_, err := u.Send(context.Background(), m)
		e := apiClassOf(t, err)
		if e.Class != Unsupported || e.Code != "SMTPUTF8" || !strings.Contains(e.Reason, "SMTPUTF8") {
			t.Errorf("%s -> %v: got %v, want unsupported (SMTPUTF8)", m.From, m.To, err)
		}
	}
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatalf("ordinary message after the refusals: %v", err)
	}
	if mails != 1 || sink.Count() != 1 || sink.Conns() != 1 {
		t.Errorf("MAIL sent %d times, %d messages over %d connections; want 1, 1, 1 (no MAIL for the UTF-8 ones, connection kept)",
			mails, sink.Count(), sink.Conns())
	}
}

// A message above the smarthost's EHLO SIZE is this upstream's limit: the
// server would answer 552 at MAIL (formerly Rejected: dead-lettered although
// another upstream could take it).
func TestSMTP_LargerThanServerSIZEIsUnsupported(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{MaxMessageBytes: 64})
	mails := 0
	sink.SetScript(testsmtp.Script{Mail: func(string) error { mails++; return nil }})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	big := &Message{ID: "big", From: "a@example.com", To: []string{"b@example.net"},
		Body: BytesBody([]byte("Subject: big\r\n\r\n" + strings.Repeat("x", 100) + "\r\n"))}
	_, err := u.Send(context.Background(), big)
	if e := apiClassOf(t, err); e.Class != Unsupported || e.Code != "size" {
		t.Errorf("got %v, want unsupported (size)", err)
	}
	if mails != 0 {
		t.Errorf("MAIL was sent %d times for a message above SIZE", mails)
	}
}

// An address with CR or LF cannot be carried by any SMTP server; go-smtp's
// plain error made it transient (retried until max_age, counted by the
// breaker).
func TestSMTP_AddressWithLineBreakIsRejected(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	m := &Message{ID: "crlf", From: "a@example.com", To: []string{"b@example.net\r\nRCPT TO:<x@evil.example>"}, Body: testMsg.Body}
	if _, err := u.Send(context.Background(), m); ClassOf(err) != Rejected {
		t.Errorf("got %v, want rejected", err)
	}
	if sink.Count() != 0 {
		t.Error("message sent")
	}
}

// rawTx is one transaction of a rawSmarthost: the replies to MAIL, each
// RCPT and DATA, in order, and to the end of the data if DATA got 354.
// With fewer replies than commands the server hangs up after them.
type rawTx struct {
	replies []string
	end     string
}

// rawSmarthost is a smarthost on 127.0.0.1 that offers PIPELINING and
// reads MAIL, nrcpt RCPTs and DATA before it answers any of them (a
// client that waited for each reply would hang), then answers with the
// next of txs. It reports each group it read and counts connections.
func rawSmarthost(t *testing.T, nrcpt int, txs ...rawTx) (addr string, groups <-chan []string, conns *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []string, len(txs)+1)
	conns = &atomic.Int32{}
	var mu sync.Mutex
	next := func() (rawTx, bool) {
		mu.Lock()
		defer mu.Unlock()
		if len(txs) == 0 {
			return rawTx{}, false
		}
		tx := txs[0]
		txs = txs[1:]
		return tx, true
	}
	serve := func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		line := func() (string, bool) {
			l, err := r.ReadString('\n')
			return strings.TrimRight(l, "\r\n"), err == nil
		}
		fmt.Fprint(c, "220 raw.test ESMTP\r\n")
		for {
			cmd, ok := line()
			switch {
			case !ok:
				return
			case strings.HasPrefix(cmd, "EHLO"):
				fmt.Fprint(c, "250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
			case cmd == "RSET":
				fmt.Fprint(c, "250 ok\r\n")
			case cmd == "QUIT":
				fmt.Fprint(c, "221 bye\r\n")
				return
			case strings.HasPrefix(cmd, "MAIL"):
				group := []string{cmd}
				for range nrcpt + 1 {
					l, ok := line()
					if !ok {
						return
					}
					group = append(group, l)
				}
				select {
				case got <- group:
				default: // more groups than txs: nobody reads them
				}
				tx, ok := next()
				if !ok {
					return
				}
				fmt.Fprint(c, strings.Join(tx.replies, "\r\n")+"\r\n")
				if len(tx.replies) < nrcpt+2 {
					return
				}
				if strings.HasPrefix(tx.replies[len(tx.replies)-1], "354") {
					for {
						l, ok := line()
						if !ok {
							return
						}
						if l == "." {
							break
						}
					}
					fmt.Fprint(c, tx.end+"\r\n")
				}
			default:
				fmt.Fprint(c, "502 5.5.1 not here\r\n")
			}
		}
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go serve(c)
		}
	}()
	return ln.Addr().String(), got, conns
}

// MAIL, the RCPTs and DATA go out together to a server with PIPELINING,
// and the per-recipient replies still make a partial delivery.
func TestSMTP_PipelinesTheEnvelope(t *testing.T) {
	addr, groups, _ := rawSmarthost(t, 2, rawTx{[]string{"250 sender ok", "250 ok", "550 5.1.1 no such user", "354 go ahead"}, "250 2.0.0 queued as P1"})
	u := newTestSMTP(t, Config{Address: addr})
	rc, err := u.Send(context.Background(), testMsg)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"MAIL FROM:<a@example.com> BODY=8BITMIME", "RCPT TO:<b@example.net>", "RCPT TO:<c@example.org>", "DATA"}
	if got := <-groups; !slices.Equal(got, want) {
		t.Errorf("server read %q before answering, want %q", got, want)
	}
	if rc.ProviderID != "2.0.0 queued as P1" || len(rc.Refused) != 1 || rc.Refused[0].Rcpt != "c@example.org" || ClassOf(rc.Refused[0].Err) != Rejected {
		t.Errorf("receipt %+v, want c@example.org refused (rejected), queued as P1", rc)
	}
}

// Once MAIL was accepted, a failure in the rest of the group is this
// message's, reported where it happened, and never taken for a stale
// idle connection (which would resend at once on a new one).
func TestSMTP_PipelinedGroupFailuresAfterMail(t *testing.T) {
	ok := rawTx{[]string{"250 ok", "250 ok", "250 ok", "354 go"}, "250 queued"}
	for _, tc := range []struct {
		name   string
		tx     rawTx
		class  Class
		reason string
		pause  bool
	}{
		{"MAIL accepted, then the connection drops", rawTx{replies: []string{"250 ok"}}, Transient, "rcpt:", false},
		{"a 421 to the first RCPT, the second never answered", rawTx{replies: []string{"250 ok", "421 4.7.0 too many messages, slow down"}}, Transient, "rcpt:", false},
		{"421 rate reply to both RCPTs", rawTx{replies: []string{"250 ok", "421 4.7.0 too many messages, slow down", "421 4.7.0 too many messages, slow down"}}, Transient, "421", true},
		{"every RCPT refused, 354 anyway, gone after the dot", rawTx{replies: []string{"250 ok", "550 5.1.1 no", "550 5.1.1 no", "354 go"}}, Rejected, "550", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The first message leaves an idle connection; the second
			// reuses it and meets tc.
			addr, _, conns := rawSmarthost(t, 2, ok, tc.tx)
			u := newTestSMTP(t, Config{Address: addr})
			if _, err := u.Send(context.Background(), testMsg); err != nil {
				t.Fatal(err)
			}
			_, err := u.Send(context.Background(), testMsg)
			var e *Error
			if !errors.As(err, &e) || e.Class != tc.class || !strings.Contains(e.Error(), tc.reason) {
				t.Fatalf("err = %v (class %s), want %s mentioning %q", err, ClassOf(err), tc.class, tc.reason)
			}
			if got := !e.RetryAt.IsZero(); got != tc.pause {
				t.Errorf("pause %v, want %v", e.RetryAt, tc.pause)
			}
			if n := conns.Load(); n != 1 {
				t.Errorf("%d connections, want 1: the message was resent on a new one", n)
			}
		})
	}
}
