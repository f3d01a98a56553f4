package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sony/gobreaker/v2"

	"github.com/relaycar/relaycar/internal/errreader"
	"github.com/relaycar/relaycar/internal/membudget"
	"github.com/relaycar/relaycar/internal/memlimit"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// Deps are the things a Relay takes from its caller rather than from
// globals, so tests can run many relays in one process.
type Deps struct {
	Logger   *slog.Logger
	Registry *prometheus.Registry
	Now      func() time.Time
	// Upstreams replaces adapters built from config, by name (tests).
	Upstreams map[string]upstreams.Upstream
	// Version is shown on the status page.
	Version string
	// SpoolFS replaces the spool's file system (tests: a full disk).
	SpoolFS spool.FS
	// Rand returns floats in [0,1) for backoff jitter and weighted
	// routing; nil is math/rand.
	Rand func() float64
}

// Relay is one running relaycar: SMTP listener, spool, delivery workers and
// admin HTTP.
type Relay struct {
	cfg       *Config
	log       *slog.Logger
	now       func() time.Time
	rand      func() float64
	spool     *spool.Spool
	budget    *membudget.Budget
	tlsConfig *tls.Config // nil without listen.tls: no STARTTLS
	// readers recycles the intake's read buffers (garbage per message).
	readers        sync.Pool
	queue          *queue
	router         *policy.Router
	gates          map[string]*policy.Gate
	ups            []upstreams.Upstream
	metrics        *metrics
	reg            *prometheus.Registry
	users          map[string][]byte
	allowedSenders map[string]bool
	maxBytes       int64
	version        string
	// AUTH brake (auth.go); zero means the default. Tests set them before Run.
	authFailDelay   time.Duration
	authMaxFailures int

	draining atomic.Bool
	ready    atomic.Bool
	inTx     atomic.Int64 // SMTP transactions between MAIL and the end of DATA

	smtpLn  net.Listener
	adminLn net.Listener
}

// New validates nothing (call Config.Validate first) but builds every part,
// so a bad certificate or an unusable spool fails before anything listens.
func New(cfg *Config, d Deps) (*Relay, error) {
	r := &Relay{cfg: cfg, log: d.Logger, now: d.Now, rand: d.Rand, reg: d.Registry, version: d.Version,
		gates: map[string]*policy.Gate{}, allowedSenders: map[string]bool{}}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.rand == nil {
		r.rand = rand.Float64
	}
	if r.reg == nil {
		r.reg = prometheus.NewRegistry()
	}
	for _, s := range cfg.Listen.AllowedSenders {
		r.allowedSenders[strings.ToLower(s)] = true
	}
	if cfg.Listen.Auth.UsersFile != "" {
		users, err := loadUsers(cfg.Listen.Auth.UsersFile)
		if err != nil {
			return nil, fmt.Errorf("listen.auth.users_file: %w", err)
		}
		r.users = users
	}
	// The certificate is loaded here, so a bad one fails before anything
	// listens (Listen, Run).
	if c := cfg.Listen.TLS; c.CertFile != "" {
		tc, err := loadTLS(c)
		if err != nil {
			return nil, fmt.Errorf("listen.tls: %w", err)
		}
		r.tlsConfig = tc
	}
	sp, err := spool.Open(cfg.Spool.Dir, spool.Options{Log: r.log, FS: d.SpoolFS})
	if err != nil {
		return nil, fmt.Errorf("spool.dir: %w", err)
	}
	r.spool = sp
	budget, why := memlimit.Resolve(cfg.Spool.MemoryBudget)
	r.budget = membudget.New(budget)
	r.log.Info("memory budget", "bytes", budget, "from", why)
	udeps := upstreams.Deps{Logger: r.log, Hostname: cfg.Listen.Hostname, Now: r.now, SyncFor: sp.SyncFor, Memory: r.budget}
	for _, uc := range cfg.Upstreams {
		u, ok := d.Upstreams[uc.Name]
		if !ok {
			var err error
			if u, err = upstreams.New(uc, udeps); err != nil {
				return nil, err
			}
		}
		r.ups = append(r.ups, u)
		r.gates[uc.Name] = policy.NewGate(u, uc, policy.GateHooks{OnStateChange: r.breakerChanged})
	}
	router, err := policy.NewRouter(cfg.Routes, r.gates, r.rand)
	if err != nil {
		return nil, err
	}
	r.router = router
	// SIZE: the largest message some route can deliver, capped by the
	// listener's own limit.
	r.maxBytes = cfg.Listen.MaxMessageBytes
	if largest := router.LargestMessageBytes(); largest > 0 {
		r.maxBytes = min(r.maxBytes, largest)
	}
	r.queue = newQueue(r.now)
	oldestAge := func() float64 {
		if t := r.queue.oldest(); !t.IsZero() {
			return r.now().Sub(t).Seconds()
		}
		return 0
	}
	r.metrics = newMetrics(r.reg, r.gates, func() float64 { return float64(r.queue.len()) }, oldestAge,
		func() float64 { return float64(r.spool.CountDead()) })
	r.reg.MustRegister(r.budget.Collectors()...)
	return r, nil
}

func (r *Relay) breakerChanged(upstream, sender string, from, to gobreaker.State) {
	lvl := slog.LevelWarn
	if to == gobreaker.StateClosed {
		lvl = slog.LevelInfo
	}
	if sender == "" {
		r.log.Log(context.Background(), lvl, "circuit breaker "+to.String(), "upstream", upstream, "from", from.String())
	} else {
		r.log.Log(context.Background(), lvl, "sender circuit breaker "+to.String(), "upstream", upstream, "sender_domain", sender, "from", from.String())
	}
}

// accept routes, prepares and spools one message as it streams in from
// body; it returns the id once the message is durable. Errors reading
// body wrap errReading, a refusal of the message is an intakeError (the
// session maps both to replies); anything else is the spool's.
// ready runs once the whole message is read, before the commit.
func (r *Relay) accept(from string, rcpts []string, body io.Reader, ri receivedInfo, ready func() error) (string, error) {
	now := r.now()
	id := spool.NewID(now)
	ri.id, ri.at = id, now
	src := &errreader.Reader{R: body}
	br, _ := r.readers.Get().(*bufio.Reader)
	if br == nil {
		br = bufio.NewReaderSize(src, readBufSize)
	} else {
		br.Reset(src)
	}
	defer func() {
		br.Reset(nil)
		r.readers.Put(br)
	}()
	hdr, err := readHeaderSection(br, maxHeaderBytes)
	if err != nil {
		if errors.Is(err, errHeaderTooLong) {
			return "", &intakeError{errHeaderTooLong}
		}
		return "", fmt.Errorf("%w: %w", errReading, err)
	}
	p, err := prepare(hdr, ri)
	if err != nil {
		return "", err
	}
	if !ri.trusted && p.relayHdrs.Len() > 0 {
		r.log.Info("X-Relay-* headers ignored for routing: client not in listen.trusted_networks", "msg_id", id, "remote_addr", ri.remote)
	}
	groups, unrouted := r.router.Split(from, rcpts, p.routingHeader(ri.trusted))
	if len(unrouted) > 0 {
		r.log.Warn("message refused: no route", "from", from, "rcpts", unrouted)
		return "", &intakeError{errNoRoute}
	}
	w, err := r.spool.Create(id)
	if err != nil {
		return "", err
	}
	defer w.Abort() // a no-op after Commit
	if _, err := w.Write(p.data); err != nil {
		return "", err
	}
	n, err := io.Copy(w, br)
	if src.Err != nil {
		return "", fmt.Errorf("%w: %w", errReading, src.Err)
	}
	if err != nil {
		return "", err
	}
	size := int64(len(p.data)) + n
	env := &Envelope{ID: id, From: from, Rcpts: rcpts, MessageID: p.messageID,
		ReceivedAt: now.UTC(), NextAttempt: now.UTC(), RemoteAddr: ri.remote}
	for _, g := range groups {
		if m := r.router.MaxMessageBytes(g.Route); m > 0 && size > m {
			return "", &intakeError{errTooBigForRoute}
		}
		env.Routes = append(env.Routes, RouteState{Route: g.Route, Pending: g.Rcpts})
	}
	if err := ready(); err != nil {
		return "", err
	}
	if err := w.Commit(env); err != nil {
		return "", err
	}
	r.metrics.received.Inc()
	r.log.Info("message queued", "msg_id", id, "from", from, "rcpt_count", len(rcpts), "size", size, "remote_addr", ri.remote)
	r.queue.add(env)
	return id, nil
}

// intakeError is a refusal of the message itself, as opposed to a failure
// to read or store it.
type intakeError struct{ err error }

func (e *intakeError) Error() string { return e.err.Error() }
func (e *intakeError) Unwrap() error { return e.err }

var (
	errReading        = errors.New("reading the message")
	errNoRoute        = errors.New("no route for a recipient")
	errTooBigForRoute = errors.New("message larger than every upstream of its route takes")
)

// SMTPAddr and AdminAddr are the bound addresses (for tests binding :0).
func (r *Relay) SMTPAddr() net.Addr  { return r.smtpLn.Addr() }
func (r *Relay) AdminAddr() net.Addr { return r.adminLn.Addr() }

// Listen binds the SMTP and admin sockets and loads the spool. Run serves.
func (r *Relay) Listen() error {
	if err := r.spool.Lock(); err != nil {
		return fmt.Errorf("spool.dir %s: %w", r.spool.Dir(), err)
	}
	envs, broken, err := r.spool.Load()
	if err != nil {
		return fmt.Errorf("loading spool: %w", err)
	}
	r.metrics.broken.Add(float64(broken))
	for _, env := range envs {
		r.queue.add(env)
	}
	if len(envs) > 0 {
		r.log.Info("spool loaded", "messages", len(envs), "broken", broken)
	}
	ln, err := net.Listen("tcp", r.cfg.Listen.Address)
	if err != nil {
		return fmt.Errorf("listen.address: %w", err)
	}
	nets := func(list []string) []netip.Prefix {
		var out []netip.Prefix
		for _, n := range list {
			p, _ := parseNetwork(n)
			out = append(out, p)
		}
		return out
	}
	r.smtpLn = &allowListener{Listener: ln, allowed: nets(r.cfg.Listen.AllowedNetworks), trusted: nets(r.cfg.Listen.TrustedNetworks),
		maxConns: r.cfg.Listen.MaxConnections, log: r.log, metrics: r.metrics}
	if r.cfg.Admin.Address != "" {
		if r.adminLn, err = net.Listen("tcp", r.cfg.Admin.Address); err != nil {
			ln.Close()
			return fmt.Errorf("admin.address: %w", err)
		}
	}
	return nil
}

// Run serves until ctx ends, then drains: /readyz turns 503, the listener
// closes, open sessions finish, deliveries go on until shutdown_grace, and
// what is left stays in the spool for the next start.
func (r *Relay) Run(ctx context.Context) error {
	if r.smtpLn == nil {
		if err := r.Listen(); err != nil {
			return err
		}
	}
	defer r.spool.Unlock()
	// Unlinks of delivered messages are left to the spool's reaper; let it
	// finish them before the lock goes.
	defer r.spool.Close()
	srv := smtp.NewServer(backend{r})
	srv.Domain = r.cfg.Listen.Hostname
	srv.MaxMessageBytes = r.maxBytes
	srv.MaxRecipients = r.cfg.Listen.MaxRecipients
	srv.ReadTimeout, srv.WriteTimeout = r.cfg.Listen.ReadTimeout, r.cfg.Listen.WriteTimeout
	// Real-world HTML often has very long lines; RFC 5322's 998 is not what
	// legacy senders honour, and the size limit still bounds memory.
	srv.MaxLineLength = 1 << 20
	srv.EnableSMTPUTF8 = true
	srv.ErrorLog = slog.NewLogLogger(r.log.Handler(), slog.LevelWarn)
	if r.users != nil {
		// Sessions decide per connection (TLS or loopback); see authAllowed.
		srv.AllowInsecureAuth = true
	}
	srv.TLSConfig = r.tlsConfig

	var adminSrv *http.Server
	errc := make(chan error, 2)
	if r.adminLn != nil {
		adminSrv = &http.Server{Handler: r.adminHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := adminSrv.Serve(r.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("admin: %w", err)
			}
		}()
	}

	// Deliveries run under their own context: it outlives ctx by the grace.
	dctx, dcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer dcancel()
	work := make(chan *item)
	var wg sync.WaitGroup
	for range r.cfg.Spool.Workers {
		wg.Go(func() { r.worker(dctx, work) })
	}
	dispatchCtx, stopDispatch := context.WithCancel(dctx)
	dispatchDone := make(chan struct{})
	go func() {
		r.queue.dispatch(dispatchCtx, work)
		close(dispatchDone)
	}()

	go func() {
		if err := srv.Serve(r.smtpLn); err != nil && !errors.Is(err, smtp.ErrServerClosed) && !r.draining.Load() {
			errc <- fmt.Errorf("smtp: %w", err)
		}
	}()
	r.ready.Store(true)
	r.log.Info("relaycar serving", "smtp", r.smtpLn.Addr().String(), "admin", r.cfg.Admin.Address,
		"spool", r.cfg.Spool.Dir, "size_limit", r.maxBytes, "upstreams", len(r.ups), "queued", r.queue.len())

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}

	// Drain.
	r.ready.Store(false)
	r.draining.Store(true)
	grace := r.cfg.ShutdownGrace
	r.log.Info("shutting down", "grace", grace.String())
	graceCtx, cancelGrace := context.WithTimeout(context.WithoutCancel(ctx), grace)
	defer cancelGrace()
	// Stop accepting, let transactions in flight finish, then close the
	// remaining connections: they are idle (connection-pooling clients)
	// and have nothing of ours to lose. go-smtp's Shutdown would wait for
	// idle connections too, holding the drain for the whole grace period.
	r.smtpLn.Close()
	poll := time.NewTicker(20 * time.Millisecond)
	for r.inTx.Load() > 0 && graceCtx.Err() == nil {
		select {
		case <-graceCtx.Done():
		case <-poll.C:
		}
	}
	poll.Stop()
	if n := r.inTx.Load(); n > 0 {
		r.log.Warn("closing SMTP sessions still in a transaction at the end of the grace period", "transactions", n)
	}
	srv.Close()
	// Keep delivering what is due until nothing is, or the grace ends.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
drain:
	for {
		busy, due := r.queue.state()
		if busy == 0 && !due {
			break
		}
		select {
		case <-graceCtx.Done():
			break drain
		case <-tick.C:
		}
	}
	stopDispatch()
	<-dispatchDone
	close(work)
	// Cancel in-flight sends at the end of the grace period.
	stop := context.AfterFunc(graceCtx, dcancel)
	wg.Wait()
	stop()
	for _, u := range r.ups {
		if c, ok := u.(upstreams.Closer); ok {
			c.Close()
		}
	}
	if adminSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		adminSrv.Shutdown(sctx)
		cancel()
	}
	r.log.Info("stopped", "left_in_spool", r.queue.len())
	return runErr
}
