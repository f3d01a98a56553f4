package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/relaycar/relaycar/internal/membudget"
)

// intake is the SMTP side of a relay: listener, sessions and AUTH reach
// only this, not the Relay, so what a client can touch is listed here.
// It hands each message to accept and never sees the spool or router.
type intake struct {
	// accept routes and spools one message (Relay.accept); its errors are
	// mapped to replies by the session.
	accept func(from string, rcpts []string, body io.Reader, ri receivedInfo, ready func() error) (string, error)
	log    *slog.Logger
	budget *membudget.Budget

	address       string
	hostname      string
	size          func() int64 // SIZE: what some route can deliver, now
	room          func() error // nil: the spool can take a message of size()
	maxRecipients int
	maxConns      int
	readTimeout   time.Duration
	writeTimeout  time.Duration
	dataTimeout   time.Duration
	bareLF        BareLFMode
	allowed       []netip.Prefix
	trusted       []netip.Prefix // empty: every allowed client is trusted
	// users, allowedSenders and cert are replaced by a reload; sessions
	// read them through the accessors. Whether AUTH and STARTTLS are
	// offered at all is fixed at start.
	usersP          atomic.Pointer[authUsers]       // hashes nil: no AUTH
	allowedSendersP atomic.Pointer[map[string]bool] // empty: any sender domain
	cert            atomic.Pointer[tls.Certificate]
	tlsConfig       *tls.Config // nil: no STARTTLS

	refused      *prometheus.CounterVec // by reply code
	authFailures prometheus.Counter
	connections  prometheus.Gauge

	// AUTH brake (auth.go); zero means the default. Tests set them before Run.
	authFailDelay   time.Duration
	authMaxFailures int
	authCache       *authCache
	bcryptSlots     chan struct{}
	compare         func(hash, pass []byte) error // bcrypt's; tests count the calls

	tx  transactions // in flight, and whether the drain has begun
	ln  net.Listener // bound by listen
	srv *smtp.Server // made by serve
}

// maxCommandLine bounds an SMTP command line, CRLF included.
const maxCommandLine = 4096

// newIntake takes what comes from the listen section alone, so a bad
// users file or certificate fails before the spool is opened; New wires
// in the rest (accept, budget, size limit, metrics).
func newIntake(c ListenConfig, log *slog.Logger) (*intake, error) {
	nets := func(list []string) []netip.Prefix {
		var out []netip.Prefix
		for _, n := range list {
			p, _ := parseNetwork(n)
			out = append(out, p)
		}
		return out
	}
	in := &intake{log: log, address: c.Address, hostname: c.Hostname, maxRecipients: c.MaxRecipients, maxConns: c.MaxConnections,
		readTimeout: c.ReadTimeout, writeTimeout: c.WriteTimeout, dataTimeout: c.DataTimeout, bareLF: c.BareLF,
		allowed: nets(c.AllowedNetworks), trusted: nets(c.TrustedNetworks),
		authCache: newAuthCache(defaultAuthCacheTTL), bcryptSlots: make(chan struct{}, bcryptSlots()),
		compare: bcrypt.CompareHashAndPassword}
	// The certificate is loaded here, so a bad one fails before anything
	// listens (Listen, Run).
	if err := in.reload(c); err != nil {
		return nil, err
	}
	if in.cert.Load() != nil {
		// Each handshake takes the current certificate: a reload rotates
		// it (cert-manager renewals) without a restart.
		in.tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return in.cert.Load(), nil }}
	}
	return in, nil
}

// reload reads the listener's reloadable settings: allowed senders, the
// users file and the certificate. Nothing changes unless all of them
// load; turning AUTH or STARTTLS on or off needs a restart (restartOnly).
func (in *intake) reload(c ListenConfig) error {
	senders := map[string]bool{}
	for _, s := range c.AllowedSenders {
		senders[strings.ToLower(s)] = true
	}
	users := &authUsers{}
	if c.Auth.UsersFile != "" {
		var err error
		if users, err = loadUsers(c.Auth.UsersFile); err != nil {
			return fmt.Errorf("listen.auth.users_file: %w", err)
		}
		if err = users.newDummy(in.usersP.Load()); err != nil {
			return fmt.Errorf("listen.auth.users_file: %w", err)
		}
	}
	var cert *tls.Certificate
	if tc := c.TLS; tc.CertFile != "" {
		kp, err := tls.LoadX509KeyPair(tc.CertFile, tc.KeyFile)
		if err != nil {
			return fmt.Errorf("listen.tls: %w", err)
		}
		cert = &kp
	}
	in.allowedSendersP.Store(&senders)
	// AUTH is on or off for the life of the process (the server was set
	// up for it at start): a users file added by a reload would refuse
	// every unauthenticated MAIL, one removed would let anyone in.
	if p := in.usersP.Load(); p == nil || (p.hashes != nil && users.hashes != nil) {
		in.usersP.Store(users)
	}
	if cert != nil {
		in.cert.Store(cert)
	}
	return nil
}

// users is the AUTH users, nil when AUTH is off.
func (in *intake) users() *authUsers {
	if p := in.usersP.Load(); p != nil && p.hashes != nil {
		return p
	}
	return nil
}

func (in *intake) allowedSenders() map[string]bool {
	if p := in.allowedSendersP.Load(); p != nil {
		return *p
	}
	return nil
}

// listen binds the SMTP socket behind the allowListener.
func (in *intake) listen() error {
	// No TCP keepalive: read_timeout and data_timeout end a silent
	// client, and each accepted connection saves its four setsockopt calls
	// (Postfix's smtpd sets none either).
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(context.Background(), "tcp", in.address)
	if err != nil {
		return fmt.Errorf("listen.address: %w", err)
	}
	in.ln = &allowListener{Listener: ln, allowed: in.allowed, trusted: in.trusted, maxConns: in.maxConns, log: in.log,
		refused: in.refused, connections: in.connections}
	return nil
}

// serve runs go-smtp on the bound listener; a failure other than the
// drain's closing of it goes to errc.
func (in *intake) serve(errc chan<- error) {
	srv := smtp.NewServer(in)
	srv.Domain = in.hostname
	srv.MaxMessageBytesFunc = in.size
	srv.MaxRecipients = in.maxRecipients
	srv.ReadTimeout, srv.WriteTimeout = in.readTimeout, in.writeTimeout
	// Real-world HTML often has very long lines; RFC 5322's 998 is not what
	// legacy senders honour, and DATA streams, so the size limit still
	// bounds memory. A command line is held whole until its CRLF, outside
	// the memory budget: those get RFC 5321's 512 octets with room for
	// extension parameters and long AUTH responses (Postfix: 2048).
	srv.MaxLineLength = 1 << 20
	srv.MaxCommandLineLength = maxCommandLine
	srv.EnableSMTPUTF8 = true
	srv.ErrorLog = slog.NewLogLogger(in.log.Handler(), slog.LevelWarn)
	if in.users() != nil {
		// Sessions decide per connection (TLS or loopback); see authAllowed.
		srv.AllowInsecureAuth = true
	}
	srv.TLSConfig = in.tlsConfig
	in.srv = srv
	go func() {
		if err := srv.Serve(in.ln); err != nil && !errors.Is(err, smtp.ErrServerClosed) && !in.tx.isDraining() {
			errc <- fmt.Errorf("smtp: %w", err)
		}
	}()
}

// stop refuses new sessions and transactions (421), stops accepting, lets
// transactions in flight finish until grace ends, then closes the
// remaining connections: they are idle (connection-pooling clients) and
// have nothing of ours to lose. go-smtp's Shutdown would wait for idle
// connections too, holding the drain for the whole grace period.
func (in *intake) stop(grace context.Context) {
	idle := in.tx.drain()
	in.ln.Close()
	select {
	case <-idle:
	case <-grace.Done():
	}
	if n := in.tx.count(); n > 0 {
		in.log.Warn("closing SMTP sessions still in a transaction at the end of the grace period", "transactions", n)
	}
	in.srv.Close()
}

// transactions counts SMTP transactions between MAIL and the end of DATA
// and, once draining, closes idle when none is left: the drain waits for
// those, not for idle connections.
type transactions struct {
	mu       sync.Mutex
	n        int
	draining bool
	idle     chan struct{} // made by drain
	idled    bool          // idle is closed
}

// add counts a transaction in (MAIL, +1) or out (its end, -1).
func (t *transactions) add(delta int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n += delta
	if t.draining && t.n == 0 && !t.idled {
		close(t.idle)
		t.idled = true
	}
}

// drain marks the intake draining and returns a channel closed once no
// transaction is in flight.
func (t *transactions) drain() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.draining {
		t.draining, t.idle = true, make(chan struct{})
		if t.n == 0 {
			close(t.idle)
			t.idled = true
		}
	}
	return t.idle
}

func (t *transactions) isDraining() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.draining
}

func (t *transactions) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

// Intake streams DATA into the spool: nothing on this path holds a whole
// message, only the header section (bounded by maxHeaderBytes) and a few
// buffers, which the session reserves from the memory budget up front.
const (
	// maxHeaderBytes bounds the header section read before the first body
	// byte is spooled: routing and the header rewrite need all of it.
	// Postfix's header_size_limit is 100 KiB; more is refused with 552.
	maxHeaderBytes = 256 << 10
	// intakeReserve is what one DATA may hold: the header section, the
	// spool writer's buffer (64 KiB), the copy buffer and slack.
	intakeReserve = maxHeaderBytes + 128<<10
	readBufSize   = 32 << 10
)

var (
	errBareLF        = errors.New("bare CR or LF in message")
	errHeaderTooLong = errors.New("header section too large")
)

// crlfReader checks line endings as the bytes pass: it fails with
// errBareLF at the first CR not followed by LF or LF not preceded by CR
// (the SMTP smuggling family, CVE-2023-51764), or, when normalize is set,
// turns each of them into CRLF as Postfix does for bare newlines.
type crlfReader struct {
	r         io.Reader
	normalize bool
	cr        bool   // the last byte seen was CR
	in        []byte // normalize: bytes read, not yet converted
	out       []byte // normalize: converted bytes not yet returned
	err       error
}

func newCRLFReader(r io.Reader, normalize bool) *crlfReader {
	c := &crlfReader{r: r, normalize: normalize}
	if normalize {
		c.in = make([]byte, 16<<10)
	}
	return c
}

func (c *crlfReader) Read(p []byte) (int, error) {
	if !c.normalize {
		return c.check(p)
	}
	for len(c.out) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		n, err := c.r.Read(c.in)
		c.out = c.convert(c.out[:0], c.in[:n])
		if err != nil {
			if err == io.EOF && c.cr {
				c.out = append(c.out, '\n')
				c.cr = false
			}
			c.err = err
		}
	}
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n, nil
}

// check passes bytes through unchanged and fails at the first bare one.
func (c *crlfReader) check(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.r.Read(p)
	if i := c.bare(p[:n]); i >= 0 {
		c.err = errBareLF
		return i, c.err
	}
	if err == io.EOF && c.cr {
		err = errBareLF
	}
	if err != nil {
		c.err = err
	}
	return n, err
}

// bare returns the index of the first bare CR or LF in p, or -1, and
// carries a trailing CR over to the next read. The common case (every LF
// after a CR, as many CRs as LFs) runs on bytes.IndexByte and bytes.Count,
// not a loop over every byte: this is on the path of every message byte.
func (c *crlfReader) bare(p []byte) int {
	if len(p) == 0 {
		return -1
	}
	if c.cr && p[0] != '\n' {
		return 0
	}
	lf := 0
	for i := 0; ; {
		j := bytes.IndexByte(p[i:], '\n')
		if j < 0 {
			break
		}
		k := i + j
		if (k == 0 && !c.cr) || (k > 0 && p[k-1] != '\r') {
			return k
		}
		lf++
		i = k + 1
	}
	paired := lf // CRs in p followed by an LF in p
	if c.cr {
		paired-- // p[0] is the LF of the previous read's CR
	}
	trailing := p[len(p)-1] == '\r'
	crs := bytes.Count(p, []byte{'\r'})
	if trailing {
		crs--
	}
	if crs != paired {
		// A CR followed by something other than LF: find it.
		for i := 0; i < len(p)-1; i++ {
			if p[i] == '\r' && p[i+1] != '\n' {
				return i + 1
			}
		}
	}
	c.cr = trailing
	return -1
}

func (c *crlfReader) convert(out, in []byte) []byte {
	for _, b := range in {
		if c.cr {
			c.cr = false
			out = append(out, '\n')
			if b == '\n' {
				continue
			}
		}
		switch b {
		case '\r':
			out = append(out, '\r')
			c.cr = true
		case '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, b)
		}
	}
	return out
}

// readHeaderSection reads from br up to the end of the header section as
// mailhdr.Split sees it: the blank line, or the first line that is neither
// a field nor a continuation (that line, which starts the body, is
// included; so is an mbox "From " line at the start). At EOF it returns
// what there was. Only the header is held; the body streams on from br.
func readHeaderSection(br *bufio.Reader, limit int) ([]byte, error) {
	var hdr []byte
	first := true
	for {
		line, err := readLine(br, limit-len(hdr))
		hdr = append(hdr, line...)
		if err == io.EOF {
			return hdr, nil
		}
		if err != nil {
			return hdr, err
		}
		content := line[:len(line)-1]
		if n := len(content); n > 0 && content[n-1] == '\r' {
			content = content[:n-1]
		}
		switch {
		case first && len(content) >= 5 && string(content[:5]) == "From ":
			continue // mbox separator; mailhdr.Split drops it
		case len(content) == 0:
			return hdr, nil
		case content[0] == ' ' || content[0] == '\t':
			if first {
				return hdr, nil
			}
		case !isFieldLine(content):
			return hdr, nil
		}
		first = false
	}
}

// readLine returns one line with its LF, or what is left before EOF
// (with io.EOF), failing once it would pass limit bytes.
func readLine(br *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > limit {
			return nil, errHeaderTooLong
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case err == io.EOF:
			return line, io.EOF
		default:
			return line, err
		}
	}
}
