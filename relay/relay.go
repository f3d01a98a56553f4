package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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

// Relay is one running relaycar: SMTP intake, spool, delivery workers and
// admin HTTP. The intake and the admin side get their own values holding
// only what they use; the Relay wires them and runs the deliveries.
type Relay struct {
	cfg   *Config
	log   *slog.Logger
	now   func() time.Time
	rand  func() float64
	spool *spool.Spool
	// lockWait is how long Listen waits for the spool lock (defaultLockWait).
	lockWait time.Duration
	budget   *membudget.Budget
	// readers recycles accept's read buffers (garbage per message).
	readers sync.Pool
	queue   *queue
	// engine is the current upstreams, gates and router (engine.go);
	// reloads replace it.
	engine   atomic.Pointer[engine]
	reloadMu sync.Mutex  // one reload at a time
	stopping atomic.Bool // set when Run begins to shut down: no reloads
	udeps    upstreams.Deps
	injected map[string]upstreams.Upstream // Deps.Upstreams
	metrics  *metrics
	// size is SIZE, what some route can deliver; a reload changes it.
	size   atomic.Int64
	quotas *quotaWatch
	// shared is nil unless an upstream has rate_limit.shared.
	shared *sharedState
	// pauses are the throttle pauses of the other upstreams, kept across
	// reloads.
	pauses policy.Pauses

	intake *intake
	api    *adminAPI
	ready  atomic.Bool
}

// New validates nothing (call Config.Validate first) but builds every part,
// so a bad certificate or an unusable spool fails before anything listens.
func New(cfg *Config, d Deps) (_ *Relay, err error) {
	r := &Relay{cfg: cfg, log: d.Logger, now: d.Now, rand: d.Rand, pauses: policy.NewLocalPauses()}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.rand == nil {
		r.rand = rand.Float64
	}
	reg := d.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	in, err := newIntake(cfg.Listen, r.log)
	if err != nil {
		return nil, err
	}
	sp, err := spool.Open(cfg.Spool.Dir, spool.Options{Log: r.log, FS: d.SpoolFS, MaxBytes: cfg.Spool.maxBytes()})
	if err != nil {
		return nil, fmt.Errorf("spool.dir: %w", err)
	}
	r.spool = sp
	if m := cfg.Spool.maxBytes(); m > 0 && m < 2*cfg.Listen.MaxMessageBytes {
		// Allowed (a small emptyDir), but worth saying: one large message
		// fills it.
		r.log.Warn("spool.max_bytes holds fewer than two messages of listen.max_message_bytes; large messages will often get 452",
			"max_bytes", m, "max_message_bytes", cfg.Listen.MaxMessageBytes)
	}
	budget, why := memlimit.Resolve(cfg.Spool.MemoryBudget)
	r.budget = membudget.New(budget)
	r.log.Info("memory budget", "bytes", budget, "from", why)
	r.newShared()
	defer func() {
		if err != nil {
			r.closeShared()
		}
	}()
	r.udeps = upstreams.Deps{Logger: r.log, Hostname: cfg.Listen.Hostname, Now: r.now, SyncFor: sp.SyncFor, Memory: r.budget, Deliveries: cfg.Spool.Workers}
	r.injected = d.Upstreams
	e, err := r.buildEngine(cfg, nil)
	if err != nil {
		return nil, err
	}
	r.engine.Store(e)
	router := e.router
	r.logRedirects(cfg)
	r.size.Store(sizeLimit(cfg, router))
	r.queue = newQueue(r.now)
	oldestAge := func() float64 {
		if t := r.queue.oldest(); !t.IsZero() {
			return r.now().Sub(t).Seconds()
		}
		return 0
	}
	r.metrics = newMetrics(reg, func() []*policy.Gate { return r.engine.Load().order }, func() float64 { return float64(r.queue.len()) }, oldestAge,
		func() float64 { return float64(r.spool.CountDead()) })
	reg.MustRegister(r.budget.Collectors()...)
	r.quotas = newQuotaWatch(cfg.Upstreams, func(name string) (upstreams.Upstream, *policy.Gate, float64) {
		e := r.engine.Load()
		uc, _ := e.upstreamConfig(name)
		return e.ups[name], e.gates[name], uc.RateLimit.PerSecond
	}, newQuotaMetrics(reg), r.log)
	if r.shared != nil {
		registerSharedUp(reg, r.shared.redis.Up)
	}
	in.accept, in.budget, in.size = r.accept, r.budget, r.size.Load
	in.room = func() error { return r.spool.Room(r.size.Load() + commitOverhead) }
	in.refused, in.authFailures, in.connections = r.metrics.smtpRefused, r.metrics.authFailed, r.metrics.connections
	r.intake = in
	r.api = &adminAPI{address: cfg.Admin.Address, allowedHosts: cfg.Admin.AllowedHosts, spool: r.spool, queue: r.queue,
		gates: func() []*policy.Gate { return r.engine.Load().order }, reg: reg, log: r.log, now: r.now, version: d.Version, ready: r.ready.Load,
		readyBytes: func() int64 { return r.size.Load() + commitOverhead }}
	return r, nil
}

// defaultLockWait bounds the wait for the spool lock at start: `relaycar
// queue` and `relaycar drain` hold it while they work on the files (a Load
// of a large spool takes seconds), another relay holds it for good.
const defaultLockWait = 10 * time.Second

// lockSpool takes the spool lock, waiting up to lockWait while another
// process holds it.
func (r *Relay) lockSpool() error {
	wait := r.lockWait
	if wait == 0 {
		wait = defaultLockWait
	}
	deadline := time.Now().Add(wait)
	for logged := false; ; logged = true {
		err := r.spool.Lock()
		if !errors.Is(err, spool.ErrLocked) || time.Now().After(deadline) {
			return err
		}
		if !logged {
			r.log.Warn("spool locked by another process (relaycar queue or drain?); waiting", "spool", r.spool.Dir(), "for", wait.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sizeLimit is SIZE: the largest message some route can deliver, capped
// by the listener's own limit.
func sizeLimit(cfg *Config, router *policy.Router) int64 {
	size := cfg.Listen.MaxMessageBytes
	if largest := router.LargestMessageBytes(); largest > 0 {
		size = min(size, largest)
	}
	return size
}

// logRedirects says, at start and at each reload, which routes send all
// their mail to redirect_all_to instead of the real recipients.
func (r *Relay) logRedirects(cfg *Config) {
	for _, rc := range cfg.Routes {
		if len(rc.RedirectAllTo) > 0 {
			r.log.Warn("route redirects all mail (redirect_all_to)", "route", rc.Name, "redirect_all_to", rc.RedirectAllTo)
		}
	}
}

func (r *Relay) breakerChanged(upstream, sender string, from, to gobreaker.State) {
	lvl := slog.LevelWarn
	if to == gobreaker.StateClosed {
		lvl = slog.LevelInfo
	}
	// One fixed message to grep for; the new state is an attribute. A
	// per-sender breaker adds the sender_domain it guards.
	attrs := []any{"upstream", upstream}
	if sender != "" {
		attrs = append(attrs, "sender_domain", sender)
	}
	attrs = append(attrs, "state", to.String(), "from", from.String())
	r.log.Log(context.Background(), lvl, "circuit breaker state changed", attrs...)
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
	e := r.acquire()
	defer e.release()
	groups, unrouted := e.router.Split(from, rcpts, p.routingHeader(ri.trusted))
	// A message drained from a peer keeps the route the peer chose: the
	// headers that chose it are gone (drain.go, routeHeader).
	if route := p.relayHdrs.Get(routeHeader); route != "" {
		switch {
		case ri.trusted && e.router.Has(route):
			groups, unrouted = []policy.Group{{Route: route, Rcpts: rcpts}}, nil
		case !ri.trusted:
			r.log.Warn("drained message's route not honoured: the draining relay is not in listen.trusted_networks; routed by this relay's rules", "msg_id", id, "route", route, "remote_addr", ri.remote)
		default:
			r.log.Warn("drained message's route not honoured: no route of that name here; routed by this relay's rules", "msg_id", id, "route", route, "remote_addr", ri.remote)
		}
	}
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
		ReceivedAt: now.UTC(), NextAttempt: now.UTC(), RemoteAddr: ri.remote, Hops: p.drainHops}
	for _, g := range groups {
		if m := e.router.MaxMessageBytes(g.Route); m > 0 && size > m {
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
func (r *Relay) SMTPAddr() net.Addr  { return r.intake.ln.Addr() }
func (r *Relay) AdminAddr() net.Addr { return r.api.ln.Addr() }

// Listen binds the SMTP and admin sockets and loads the spool. Run serves.
func (r *Relay) Listen() error {
	if err := r.lockSpool(); err != nil {
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
	if err := r.intake.listen(); err != nil {
		return err
	}
	if err := r.api.listen(); err != nil {
		r.intake.ln.Close()
		return err
	}
	return nil
}

// Run serves until ctx ends, then drains: /readyz turns 503, the listener
// closes, open sessions finish, deliveries go on until shutdown.grace, and
// what is left stays in the spool for the next start.
func (r *Relay) Run(ctx context.Context) error {
	if r.intake.ln == nil {
		if err := r.Listen(); err != nil {
			return err
		}
	}
	defer r.spool.Unlock()
	// Unlinks of delivered messages are left to the spool's reaper; let it
	// finish them before the lock goes.
	defer r.spool.Close()

	errc := make(chan error, 2)
	r.api.serve(errc)
	r.quotas.start(ctx)
	d := r.startWorkers(ctx)
	r.intake.serve(errc)
	r.ready.Store(true)
	r.log.Info("relaycar serving", "smtp", r.intake.ln.Addr().String(), "admin", r.cfg.Admin.Address,
		"spool", r.cfg.Spool.Dir, "size_limit", r.size.Load(), "upstreams", len(r.engine.Load().ups), "queued", r.queue.len())

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}

	r.ready.Store(false)
	// A reload in progress finishes first; later ones see stopping.
	r.reloadMu.Lock()
	r.stopping.Store(true)
	r.reloadMu.Unlock()
	grace := r.engine.Load().cfg.Grace()
	r.log.Info("shutting down", "grace", grace.String())
	graceCtx, cancelGrace := context.WithTimeout(context.WithoutCancel(ctx), grace)
	defer cancelGrace()
	r.intake.stop(graceCtx)
	d.drain(graceCtx)
	left := r.queue.len()
	if drainTo := r.engine.Load().cfg.Shutdown.DrainTo; drainTo != "" && left > 0 {
		left = r.drainToPeer(ctx, drainTo, grace)
	}
	r.closeUpstreams()
	r.closeShared()
	r.api.stop()
	r.log.Info("stopped", "left_in_spool", left)
	return runErr
}

// drainToPeer hands what the grace period did not deliver to
// shutdown.drain_to, for at most another grace period (at least 5 s), and returns how
// many messages are left here. It runs after the workers stopped, so
// nothing else touches the spool.
func (r *Relay) drainToPeer(ctx context.Context, to string, grace time.Duration) int {
	budget := max(grace, 5*time.Second)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), budget)
	defer cancel()
	// The queue, not the files: an update the disk refused (a full disk)
	// lives only here, and the files would hand delivered recipients over.
	envs := r.queue.envelopes()
	slices.SortFunc(envs, func(a, b *Envelope) int { return strings.Compare(a.ID, b.ID) })
	r.log.Info("draining the spool to the peer", "to", to, "messages", len(envs))
	res := Drainer{To: to, Hostname: r.cfg.Listen.Hostname, Timeout: min(budget, 30*time.Second), ConnectFor: budget, Log: r.log,
		Redirect: r.engine.Load().router.RedirectAllTo}.Drain(dctx, r.spool, envs)
	r.log.Info("drained to peer", "to", to, "drained", res.Drained, "recipients", res.Recipients, "left", res.Left, "dead_letters", res.Dead)
	return res.Left
}

// deliveries are the running workers and the dispatcher that feeds them.
type deliveries struct {
	queue *queue
	work  chan *item
	// workers is the worker goroutines; dispatched is closed when the
	// dispatcher has returned.
	workers      sync.WaitGroup
	dispatched   chan struct{}
	stopDispatch context.CancelFunc
	// cancel ends sends in flight, at the end of the grace period.
	cancel context.CancelFunc
}

// startWorkers starts spool.workers workers and the dispatcher, under a
// context of their own: deliveries outlive ctx by the grace period.
func (r *Relay) startWorkers(ctx context.Context) *deliveries {
	dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	dispatchCtx, stopDispatch := context.WithCancel(dctx)
	d := &deliveries{queue: r.queue, work: make(chan *item), dispatched: make(chan struct{}), stopDispatch: stopDispatch, cancel: cancel}
	for range r.cfg.Spool.Workers {
		d.workers.Go(func() { r.worker(dctx, d.work) })
	}
	go func() {
		r.queue.dispatch(dispatchCtx, d.work)
		close(d.dispatched)
	}()
	return d
}

// drain keeps delivering what is due until nothing is and no worker holds
// a message, or grace ends; then it stops the dispatcher, cancels the
// sends still in flight once grace ends, and waits for the workers.
func (d *deliveries) drain(grace context.Context) {
	d.queue.waitIdle(grace)
	d.stopDispatch()
	<-d.dispatched
	close(d.work)
	stop := context.AfterFunc(grace, d.cancel)
	d.workers.Wait()
	stop()
	d.cancel()
}

// closeUpstreams releases the adapters' connections once nothing sends.
func (r *Relay) closeUpstreams() {
	e := r.engine.Load()
	e.users.Lock() // deliveries are over; wait for none
	defer e.users.Unlock()
	ups := make([]upstreams.Upstream, 0, len(e.ups))
	for _, u := range e.ups {
		ups = append(ups, u)
	}
	closeAll(ups)
}
