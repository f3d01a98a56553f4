package relay

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/crypto/bcrypt"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/policy"
)

// startTuned is startRelay with a hook on the Relay between New and Run.
func startTuned(t *testing.T, ups []*recorder, routes []policy.RouteConfig, edit func(*Config), tune func(*Relay)) *testRelay {
	t.Helper()
	return startRelayTB(t, ups, routes, edit, true, tune)
}

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		return -1
	}
	if c := out.GetCounter(); c != nil {
		return c.GetValue()
	}
	return out.GetGauge().GetValue()
}

// raw is a hand-driven SMTP connection.
type raw struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialSMTP(t *testing.T, addr string) *raw {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &raw{t: t, c: c, br: bufio.NewReader(c)}
}

// reply reads one reply, joining continuation lines; "" at EOF.
func (r *raw) reply() string {
	var full []string
	for {
		l, err := r.br.ReadString('\n')
		if l != "" {
			full = append(full, strings.TrimRight(l, "\r\n"))
		}
		if err != nil || len(l) < 4 || l[3] != '-' {
			return strings.Join(full, "\n")
		}
	}
}

func (r *raw) send(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.c, s); err != nil {
		r.t.Fatalf("write %q: %v", s, err)
	}
}

// cmd sends one line and returns the reply.
func (r *raw) cmd(line string) string {
	r.t.Helper()
	r.send(line + "\r\n")
	return r.reply()
}

func (r *raw) want(line, prefix string) {
	r.t.Helper()
	if got := r.cmd(line); !strings.HasPrefix(got, prefix) {
		r.t.Fatalf("%s: reply %q, want %q", line, got, prefix)
	}
}

// closedWithin reads until EOF and reports how long that took and every
// reply line seen; it fails the test if the relay keeps the connection
// open past limit.
func (r *raw) closedWithin(limit time.Duration) (time.Duration, string) {
	r.t.Helper()
	start := time.Now()
	r.c.SetReadDeadline(start.Add(limit))
	b, err := io.ReadAll(r.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		r.t.Fatalf("connection still open after %s; got %q", limit, b)
	}
	return time.Since(start), string(b)
}

// Item 6: listen.max_connections. Connections beyond it get 421 4.3.2 at
// connect, the gauge shows the open ones, and a freed slot is usable.
func TestSMTP_MaxConnections421(t *testing.T) {
	t.Parallel()
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, func(c *Config) { c.Listen.MaxConnections = 2 })
	var held []*raw
	for range 2 {
		r := dialSMTP(t, tr.smtp)
		if g := r.reply(); !strings.HasPrefix(g, "220 ") {
			t.Fatalf("greeting %q", g)
		}
		held = append(held, r)
	}
	over := dialSMTP(t, tr.smtp)
	if g := over.reply(); !strings.HasPrefix(g, "421 4.3.2 ") {
		t.Fatalf("third connection: %q, want 421 4.3.2", g)
	}
	if _, err := over.br.ReadByte(); err != io.EOF {
		t.Errorf("refused connection not closed: %v", err)
	}
	if v := value(tr.metrics.smtpRefused.WithLabelValues("421")); v != 1 {
		t.Errorf(`relaycar_smtp_refused_total{code="421"} = %v, want 1`, v)
	}
	if v := value(tr.metrics.connections); v != 2 {
		t.Errorf("relaycar_smtp_connections = %v, want 2", v)
	}
	held[0].want("QUIT", "221")
	waitFor(t, "the slot to free", func() bool { return value(tr.metrics.connections) == 1 })
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
		t.Fatalf("after a slot freed: %v", err)
	}
	waitFor(t, "the gauge to settle", func() bool { return value(tr.metrics.connections) == 1 })
}

// Item 6: a command line dripped one byte at a time used to hold the
// connection for 4 x read_timeout: bufio hands over the partial line
// without the timeout, go-smtp runs it as a command and waits again,
// until its error threshold. Now the first timeout ends the connection.
func TestSMTP_DrippedCommandLineClosedAfterOneReadTimeout(t *testing.T) {
	t.Parallel()
	const rt = 500 * time.Millisecond
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, func(c *Config) { c.Listen.ReadTimeout = rt })
	// The second is a whole command without its CRLF, in one write: the
	// partial line go-smtp still dispatches must not start a transaction.
	for _, tc := range []struct {
		drip string
		step int
	}{{strings.Repeat("x", 100), 1}, {"MAIL FROM:<a@example.com>", 100}} {
		drip := tc.drip
		r := dialSMTP(t, tr.smtp)
		r.reply()
		r.want("EHLO drip", "250")
		stop := make(chan struct{})
		dripped := make(chan struct{})
		go func() {
			defer close(dripped)
			tick := time.NewTicker(rt / 20)
			defer tick.Stop()
			for i := 0; i < len(drip); i += tc.step {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if _, err := r.c.Write([]byte(drip[i:min(len(drip), i+tc.step)])); err != nil {
					return
				}
			}
		}()
		took, out := r.closedWithin(6 * rt)
		close(stop)
		<-dripped
		if took > 3*rt {
			t.Errorf("%.10q...: connection closed after %s, want about one read_timeout (%s); output %q", drip, took, rt, out)
		}
		if !strings.Contains(out, "421 4.4.2") || strings.Contains(out, "250") {
			t.Errorf("%.10q...: output %q, want a 421 4.4.2 and no 250", drip, out)
		}
	}
}

// A timed-out "BDAT 0 LAST" without its CRLF used to be run as a
// command and queue an empty message.
func TestSMTP_TimedOutPartialBDATQueuesNothing(t *testing.T) {
	t.Parallel()
	const rt = 300 * time.Millisecond
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.ReadTimeout = rt })
	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO bdat", "250")
	r.want("MAIL FROM:<a@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.send("BDAT 0 LAST")
	if _, out := r.closedWithin(4 * rt); strings.Contains(out, "250") {
		t.Errorf("partial BDAT line: %q, want no 250", out)
	}
	time.Sleep(100 * time.Millisecond)
	if envs, _ := tr.spool.List(); len(envs)+len(a.accepted()) != 0 {
		t.Errorf("a message was queued")
	}
}

// Item 6: DATA gets read_timeout per read, not one read_timeout in total:
// a slow but steady message arriving over 4 x read_timeout is accepted.
func TestSMTP_SlowSteadyDATAAccepted(t *testing.T) {
	t.Parallel()
	// Drips at a quarter (DATA) and half (BDAT) of read_timeout: a late
	// wake-up on a loaded machine stays inside it.
	const rt = 600 * time.Millisecond
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.ReadTimeout = rt })
	r := dialSMTP(t, tr.smtp)
	r.c.SetDeadline(time.Now().Add(30 * time.Second))
	r.reply()
	r.want("EHLO slow", "250")
	r.want("MAIL FROM:<a@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.want("DATA", "354")
	r.send("Subject: slow\r\n\r\n")
	for range 16 { // 16 x 150ms = 4 read timeouts
		time.Sleep(150 * time.Millisecond)
		r.send(strings.Repeat("y", 60) + "\r\n")
	}
	if got := r.cmd("."); !strings.HasPrefix(got, "250 2.0.0 OK: queued") {
		t.Fatalf("slow DATA: %q, want 250", got)
	}
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })

	// BDAT (CHUNKING) reads through the same deadlines: one chunk dripped
	// over 4 read timeouts, then the last one.
	body := "Subject: bdat\r\n\r\n" + strings.Repeat("w", 58) + "\r\n"
	r.want("MAIL FROM:<a@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.send("BDAT " + itoa(len(body)) + "\r\n")
	for i := 0; i < len(body); i += len(body) / 6 {
		time.Sleep(300 * time.Millisecond)
		r.send(body[i:min(len(body), i+len(body)/6)])
	}
	if got := r.reply(); !strings.HasPrefix(got, "250") {
		t.Fatalf("BDAT chunk: %q", got)
	}
	if got := r.cmd("BDAT 0 LAST"); !strings.HasPrefix(got, "250 2.0.0 OK: queued") {
		t.Fatalf("BDAT LAST: %q, want 250", got)
	}
	waitFor(t, "BDAT delivery", func() bool { return len(a.accepted()) == 2 })
}

// Item 6: listen.data_timeout bounds the whole DATA even while bytes keep
// arriving within read_timeout.
func TestSMTP_DataTimeoutBoundsWholeMessage(t *testing.T) {
	t.Parallel()
	const rt, whole = 400 * time.Millisecond, 900 * time.Millisecond
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.ReadTimeout, c.Listen.DataTimeout = rt, whole })
	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO slow", "250")
	r.want("MAIL FROM:<a@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.want("DATA", "354")
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for range 60 { // 6s at most
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := r.c.Write([]byte("z\r\n")); err != nil {
				return
			}
		}
	}()
	took, out := r.closedWithin(5 * time.Second)
	close(stop)
	<-sent
	if !strings.HasPrefix(out, "451 4.4.2 ") {
		t.Errorf("reply %q, want 451 4.4.2 first", out)
	}
	if took > whole+2*rt {
		t.Errorf("DATA ran %s, want it cut at data_timeout %s", took, whole)
	}
	if n := len(a.accepted()); n != 0 {
		t.Errorf("%d messages accepted", n)
	}
}

// Item 7: AUTH failures are delayed, counted, and the third closes the
// connection with 421 4.7.0.
func TestSMTP_AuthFailuresDelayedAndCapped(t *testing.T) {
	t.Parallel()
	const delay = 60 * time.Millisecond
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("app:"+string(hash)+"\n"), 0o600)
	a := &recorder{name: "a"}
	tr := startTuned(t, []*recorder{a}, nil, func(c *Config) { c.Listen.Auth.UsersFile = users },
		func(r *Relay) { r.intake.authFailDelay, r.intake.authMaxFailures = delay, 3 })

	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO brute", "250")
	bad := "AUTH PLAIN AGFwcAB3cm9uZw==" // \0app\0wrong
	for i := 1; i <= 3; i++ {
		start := time.Now()
		got := r.cmd(bad)
		if took := time.Since(start); took < delay {
			t.Errorf("failure %d answered after %s, want at least %s", i, took, delay)
		}
		want := "535 5.7.8"
		if i == 3 {
			want = "421 4.7.0"
		}
		if !strings.HasPrefix(got, want) {
			t.Fatalf("failure %d: %q, want %s", i, got, want)
		}
	}
	if _, out := r.closedWithin(2 * time.Second); out != "" {
		t.Errorf("after the 421: %q, want the connection closed", out)
	}
	if v := value(tr.metrics.authFailed); v != 3 {
		t.Errorf("relaycar_smtp_auth_failures_total = %v, want 3", v)
	}
	// LOGIN counts the same way, and a good password still works.
	c, err := smtp.Dial(tr.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(sasl.NewLoginClient("app", "nope")); smtpCode(err) != 535 {
		t.Errorf("LOGIN with a bad password: %v, want 535", err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "app", "s3cret")); err != nil {
		t.Errorf("good password after one failure: %v", err)
	}
	if v := value(tr.metrics.authFailed); v != 4 {
		t.Errorf("relaycar_smtp_auth_failures_total = %v, want 4", v)
	}
}

// Item 8: RFC 6531 (non-ASCII needs SMTPUTF8 on MAIL) and RFC 5321
// 4.5.3.1 (local part 64, address 254, label 63 octets).
func TestSMTP_AddressUTF8AndLengthLimits(t *testing.T) {
	t.Parallel()
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO limits", "250")
	local64, local65 := strings.Repeat("l", 64), strings.Repeat("l", 65)
	label63, label64 := strings.Repeat("d", 63), strings.Repeat("d", 64)
	long := strings.Repeat("a", 60) + "@" + strings.Repeat(label63+".", 3) + "com" // 256 octets
	for _, tc := range []struct{ line, want string }{
		{"MAIL FROM:<josé@exemple.fr>", "553 5.6.7"},
		{"MAIL FROM:<app@exemplé.fr>", "553 5.6.7"},
		{"MAIL FROM:<" + local65 + "@example.com>", "501 5.1.7"},
		{"MAIL FROM:<" + long + ">", "501 5.1.7"},
		{"MAIL FROM:<a@example.com>", "250"},
		{"RCPT TO:<用户@例子.广告>", "553 5.6.7"},
		{"RCPT TO:<" + local65 + "@example.net>", "501 5.1.3"},
		{"RCPT TO:<x@" + label64 + ".example.net>", "501 5.1.3"},
		{"RCPT TO:<" + long + ">", "501 5.1.3"},
		{"RCPT TO:<" + local64 + "@" + label63 + ".example.net>", "250"},
		{"RSET", "250"},
		{"MAIL FROM:<josé@exemple.fr> SMTPUTF8", "250"},
		{"RCPT TO:<用户@例子.广告>", "250"},
		{"RSET", "250"},
		// SMTPUTF8 belongs to the transaction: after RSET it is gone.
		{"MAIL FROM:<a@example.com>", "250"},
		{"RCPT TO:<josé@exemple.fr>", "553 5.6.7"},
	} {
		if got := r.cmd(tc.line); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: %q, want %s", tc.line, got, tc.want)
		}
	}
}

// Item 9: go-smtp's DATA reader drops ".\r" after a CRLF when no LF
// follows, so "\r\n.\r" never reached the bare-CR check and the relay
// altered the body. It is refused with 550 5.6.0 in both bare_lf modes,
// also when the client sends the body before the 354 (go-smtp then reads
// it ahead of Data).
func TestSMTP_DotCRRefused(t *testing.T) {
	t.Parallel()
	for _, mode := range []BareLFMode{BareLFReject, BareLFNormalize} {
		t.Run(string(mode), func(t *testing.T) {
			a := &recorder{name: "a"}
			tr := startRelay(t, []*recorder{a}, nil, func(c *Config) { c.Listen.BareLF = mode })
			for _, body := range []string{
				"Subject: x\r\n\r\nhello\r\n.\rworld\r\n.\r\n",
				"Subject: x\r\n\r\nhello\r\n.\r\r\n.\r\nRSET\r\n.\r\n",
				".\rSubject: x\r\n\r\nhi\r\n.\r\n",
			} {
				r := dialSMTP(t, tr.smtp)
				r.reply()
				r.want("EHLO dot", "250")
				r.want("MAIL FROM:<a@example.com>", "250")
				r.want("RCPT TO:<b@example.net>", "250")
				r.want("DATA", "354")
				r.send(body)
				if got := r.reply(); !strings.HasPrefix(got, "550 5.6.0") {
					t.Errorf("%q: %q, want 550 5.6.0", body, got)
				}
			}
			// The same body pipelined with DATA, before the 354.
			r := dialSMTP(t, tr.smtp)
			r.reply()
			r.want("EHLO dot", "250")
			r.want("MAIL FROM:<a@example.com>", "250")
			r.want("RCPT TO:<b@example.net>", "250")
			r.send("DATA\r\nSubject: x\r\n\r\nhello\r\n.\rworld\r\n.\r\n")
			if got := r.reply(); !strings.HasPrefix(got, "354") {
				t.Fatalf("DATA: %q", got)
			}
			if got := r.reply(); !strings.HasPrefix(got, "550 5.6.0") {
				t.Errorf("pipelined: %q, want 550 5.6.0", got)
			}
			// A dot-stuffed line is still fine.
			if err := tr.send("a@example.com", []string{"b@example.net"}, "Subject: x\r\n\r\n.leading dot\r\n"); err != nil {
				t.Fatalf("dot-stuffed message: %v", err)
			}
			waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
			if d := string(a.accepted()[0].Data); !strings.Contains(d, "\r\n.leading dot\r\n") {
				t.Errorf("dot-stuffed line altered: %q", d)
			}
		})
	}
}

func TestDotCRScan_AcrossReads(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]bool{
		"a\r\n.\rb":          true,
		"a\r\n.\r\r\n":       true,
		"a\r\n.\r\n":         false,
		"a\r\n..\rb":         false, // dot-stuffed: go-smtp keeps ".\rb" and the bare-CR check sees it
		"a\r.\rb\r\n":        false,
		"a\r\n.\r":           false, // not decided until the next byte
		"x\r\n.\r\n.\rz\r\n": true,  // after the end of DATA too: never legitimate
		"x\r\n.\r\n\r\n.\rz": true,
	} {
		for _, size := range []int{1, 2, 3, 5, 64} {
			var s dotCRScan
			got := false
			for b := []byte(in); len(b) > 0; b = b[min(size, len(b)):] {
				got = s.feed(b[:min(size, len(b))]) || got
			}
			if got != want {
				t.Errorf("%q in reads of %d: %v, want %v", in, size, got, want)
			}
		}
	}
}

// Item 14: X-Relay-* headers steer routing only from listen.trusted_networks;
// from other clients they are removed and ignored.
func TestSMTP_RelayHeadersOnlyFromTrustedNetworks(t *testing.T) {
	t.Parallel()
	routes := []policy.RouteConfig{
		{Name: "marketing", Match: &policy.Match{Headers: map[string]string{"X-Relay-Route": "marketing"}}, Upstreams: []string{"m"}},
		{Name: "default", Upstreams: []string{"d"}},
	}
	msg := "From: a@example.com\r\nX-Relay-Route: marketing\r\nSubject: route\r\n\r\nhi\r\n"
	for _, tc := range []struct {
		name    string
		trusted []string
		want    string
	}{
		{"empty list trusts every allowed client", nil, "m"},
		{"loopback trusted", []string{"127.0.0.0/8"}, "m"},
		{"loopback not trusted", []string{"10.0.0.0/8"}, "d"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, d := &recorder{name: "m"}, &recorder{name: "d"}
			tr := startRelay(t, []*recorder{m, d}, routes, func(c *Config) { c.Listen.TrustedNetworks = tc.trusted })
			if err := tr.send("a@example.com", []string{"b@example.net"}, msg); err != nil {
				t.Fatal(err)
			}
			got, other := m, d
			if tc.want == "d" {
				got, other = d, m
			}
			waitFor(t, "delivery", func() bool { return len(got.accepted()) == 1 })
			if n := len(other.accepted()); n != 0 {
				t.Errorf("%d messages on the other route", n)
			}
			if data := string(got.accepted()[0].Data); strings.Contains(data, "X-Relay-") {
				t.Errorf("X-Relay header delivered: %q", data)
			}
		})
	}
}

// The listener's own accounting, without go-smtp: Close counts a
// connection out once, however often it is called.
func TestAllowListener_CountsOpenConnections(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	zero := func() float64 { return 0 }
	m := newMetrics(reg, nil, zero, zero, zero)
	l := &allowListener{Listener: ln, allowed: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, maxConns: 1, log: slog.New(slog.DiscardHandler), refused: m.smtpRefused, connections: m.connections}
	defer l.Close()
	accepted := make(chan net.Conn, 2)
	go func() {
		for range 2 {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	c1, _ := net.Dial("tcp", ln.Addr().String())
	defer c1.Close()
	sc := <-accepted
	c2, _ := net.Dial("tcp", ln.Addr().String())
	defer c2.Close()
	c2.SetReadDeadline(time.Now().Add(3 * time.Second))
	if line, _ := bufio.NewReader(c2).ReadString('\n'); !strings.HasPrefix(line, "421 4.3.2") {
		t.Errorf("over the cap: %q", line)
	}
	sc.Close()
	sc.Close()
	if v := value(m.connections); v != 0 {
		t.Errorf("gauge after close = %v, want 0", v)
	}
	if n := l.open.Load(); n != 0 {
		t.Errorf("open = %d, want 0", n)
	}
}

// Under STARTTLS go-smtp reads through a *tls.Conn over the clientConn:
// the DATA deadlines and the AUTH brake (421 sent over TLS) hold there too.
func TestSMTP_HardeningOverSTARTTLS(t *testing.T) {
	t.Parallel()
	const rt = 500 * time.Millisecond // 5x the drip below
	cert := testsmtp.NewCert(t)
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("app:"+string(hash)+"\n"), 0o600)
	a := &recorder{name: "a"}
	tr := startTuned(t, []*recorder{a}, nil, func(c *Config) {
		c.Listen.TLS = TLSConfig{CertFile: cert.CertFile, KeyFile: cert.KeyFile}
		c.Listen.Auth.UsersFile = users
		c.Listen.ReadTimeout = rt
	}, func(r *Relay) { r.intake.authFailDelay = 5 * time.Millisecond })
	tlsCfg := &tls.Config{RootCAs: cert.Pool, ServerName: "localhost"}

	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO tls", "250")
	r.want("STARTTLS", "220")
	tc := tls.Client(r.c, tlsCfg)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	r.c, r.br = tc, bufio.NewReader(tc)
	r.want("EHLO tls", "250")
	r.want("AUTH PLAIN AGFwcABzM2NyZXQ=", "235") // \0app\0s3cret
	r.want("MAIL FROM:<a@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.want("DATA", "354")
	r.send("Subject: slow tls\r\n\r\n")
	for range 12 { // 12 x 100ms: past two read timeouts in total
		time.Sleep(100 * time.Millisecond)
		r.send(strings.Repeat("t", 60) + "\r\n")
	}
	if got := r.cmd("."); !strings.HasPrefix(got, "250 2.0.0 OK: queued") {
		t.Fatalf("slow DATA over TLS: %q, want 250", got)
	}

	c2, err := smtp.DialStartTLS(tr.smtp, tlsCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	var last error
	for range 3 {
		last = c2.Auth(sasl.NewPlainClient("", "app", "wrong"))
	}
	if smtpCode(last) != 421 {
		t.Fatalf("third failure over TLS: %v, want 421", last)
	}
	if err := c2.Noop(); err == nil {
		t.Error("connection still usable after the 421")
	}
}

// A command line is held whole until its CRLF, outside the memory budget
// (1,000 connections each holding a 1 MiB line would be 1 GB): one over
// maxCommandLine ends the connection with 500 5.4.0 without waiting for
// the rest, while message lines keep their 1 MiB limit.
func TestSMTP_CommandLinesBoundedDataLinesLong(t *testing.T) {
	t.Parallel()
	a := &recorder{name: "a"}
	tr := startRelay(t, []*recorder{a}, nil, nil)
	r := dialSMTP(t, tr.smtp)
	r.reply()
	r.want("EHLO long", "250")
	r.want("NOOP "+strings.Repeat("n", maxCommandLine-16), "250")
	r.want("MAIL FROM:<app@example.com>", "250")
	r.want("RCPT TO:<b@example.net>", "250")
	r.want("DATA", "354")
	long := strings.Repeat("x", 200_000)
	r.want("Subject: long\r\n\r\n"+long+"\r\n.", "250")
	waitFor(t, "delivery", func() bool { return len(a.accepted()) == 1 })
	if !strings.Contains(string(a.accepted()[0].Data), long) {
		t.Error("the 200,000-byte line did not reach the upstream whole")
	}

	r.send("NOOP " + strings.Repeat("n", maxCommandLine)) // no CRLF: nothing to wait for
	if _, out := r.closedWithin(5 * time.Second); !strings.HasPrefix(out, "500 5.4.0") {
		t.Errorf("after an over-long command line: %q, want 500 5.4.0 and the connection closed", out)
	}
}
