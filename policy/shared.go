package policy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// SharedOptions configures the Redis connection behind shared limits.
type SharedOptions struct {
	Address  string
	Password string
	TLS      bool
	// KeyPrefix starts every key ("relaycar").
	KeyPrefix string
	// Replicas divides per_second while Redis is unreachable.
	Replicas int
	Logger   *slog.Logger
	// Timeout bounds each dial, read and write; 0 is 200 ms. A worker
	// waits at most this long for a dead or slow Redis.
	Timeout time.Duration
	// ProbeEvery is how often Redis is probed (to notice it came back, or
	// went away while idle); 0 is 1 s.
	ProbeEvery time.Duration
}

// Shared is one Redis client for every shared limit and pause of a relay,
// and whether Redis answers. While it does not, every limiter falls back
// to its local share and pauses stay local; mail never waits on Redis.
type Shared struct {
	rdb        *redis.Client
	rl         *redis_rate.Limiter
	prefix     string
	replicas   int
	log        *slog.Logger
	probeEvery time.Duration
	up         atomic.Bool
	// lastOK is the unix nanos of Redis's last successful write.
	lastOK atomic.Int64
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once

	mu sync.Mutex
	// limiters are the shared limiters by key (the latest of each, as a
	// reload makes new ones), for the probe to try their keys.
	limiters map[string]*sharedLimiter
}

// NewShared connects (lazily) to Redis and probes it once, bounded by the
// timeout: a Redis that is down at start means the local fallback, not a
// relay that does not start.
func NewShared(o SharedOptions) *Shared {
	if o.Timeout <= 0 {
		o.Timeout = 200 * time.Millisecond
	}
	if o.ProbeEvery <= 0 {
		o.ProbeEvery = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	ro := &redis.Options{
		Addr:     o.Address,
		Password: o.Password,
		Protocol: 2,
		// go-redis retries a dial 5 times and a command 3 times by default:
		// about 400 ms per call with Redis down. Fail at once instead.
		DialerRetries:         1,
		MaxRetries:            -1,
		DialTimeout:           o.Timeout,
		ReadTimeout:           o.Timeout,
		WriteTimeout:          o.Timeout,
		PoolTimeout:           o.Timeout,
		ContextTimeoutEnabled: true,
		PoolSize:              8,
		// No CLIENT SETINFO or MAINT_NOTIFICATIONS round trips per connection.
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	}
	if o.TLS {
		host, _, _ := net.SplitHostPort(o.Address)
		ro.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	}
	quietRedis.Do(func() { redis.SetLogger(discardRedisLog{}) })
	rdb := redis.NewClient(ro)
	s := &Shared{rdb: rdb, rl: redis_rate.NewLimiter(rdb), prefix: o.KeyPrefix, replicas: max(1, o.Replicas),
		log: o.Logger.With("redis", o.Address), probeEvery: o.ProbeEvery, stop: make(chan struct{}), done: make(chan struct{}),
		limiters: map[string]*sharedLimiter{}}
	s.up.Store(true)
	s.probe()
	go s.prober()
	return s
}

// quietRedis silences go-redis's own logger (process-wide): it prints every
// failed dial, once a second while Redis is down; Shared logs each switch
// once instead.
var quietRedis sync.Once

type discardRedisLog struct{}

func (discardRedisLog) Printf(context.Context, string, ...any) {}

// Up reports whether the shared limits work: Redis took the last probe's
// writes and no call failed since (the relaycar_rate_limit_shared_up
// gauge).
func (s *Shared) Up() bool { return s.up.Load() }

// Close stops the prober and closes the connections.
func (s *Shared) Close() error {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.rdb.Close()
}

// prober probes Redis while it is down (so the shared limit comes back
// without any message paying for the attempt) and while it is idle (so
// the gauge is right without traffic).
func (s *Shared) prober() {
	defer close(s.done)
	t := time.NewTicker(s.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			if !s.up.Load() || time.Since(time.Unix(0, s.lastOK.Load())) >= s.probeEvery {
				s.probe()
			}
		}
	}
}

// probeLimit admits every probe (a burst of 1000 per millisecond), so each
// one writes its key.
var probeLimit = redis_rate.Limit{Rate: 1, Burst: 1000, Period: time.Millisecond}

// probe is the only way back from the fallback: it runs the rate-limit
// script as a message would, on a key of its own (an admitted call always
// writes), and at no cost on every limiter's key (a key of another type
// fails each Take there with WRONGTYPE). A PING, or a read, succeeds on a
// read-only replica after a failover or a Redis out of memory, and the
// next message would switch back: two log lines a second and a gauge at 1.
func (s *Shared) probe() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*s.probeEvery)
	defer cancel()
	res, err := s.rl.AllowN(ctx, s.prefix+":probe", probeLimit, 1)
	if err == nil && res.Allowed == 0 {
		return // refused, so nothing was written: no news
	}
	s.mu.Lock()
	ls := make([]*sharedLimiter, 0, len(s.limiters))
	for _, l := range s.limiters {
		ls = append(ls, l)
	}
	s.mu.Unlock()
	for _, l := range ls {
		if err != nil {
			break
		}
		_, err = s.rl.AllowN(ctx, l.key, l.limit(), 0)
	}
	if s.result(ctx, err, true) && s.up.CompareAndSwap(false, true) {
		s.log.Info("shared rate limit available again")
	}
}

// result records a Redis call's outcome; wrote says a successful call
// wrote. A failure switches to the fallback, logged once; only the probe
// switches back. It returns false when the call failed.
func (s *Shared) result(ctx context.Context, err error, wrote bool) bool {
	if err == nil || errors.Is(err, redis.Nil) {
		if wrote {
			s.lastOK.Store(time.Now().UnixNano())
		}
		return true
	}
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		// Our own deadline (max_wait) or shutdown, not Redis's fault.
		return false
	}
	if s.up.CompareAndSwap(true, false) {
		s.log.Warn("shared rate limit unavailable; using the local fallback", "replicas", s.replicas, "err", err)
	}
	return false
}

// Limiter is the shared rate limit of one upstream. Its fallback, used
// while Redis is down, is this replica's share: perSecond / replicas.
func (s *Shared) Limiter(upstream string, perSecond float64, burst int) Limiter {
	burst = max(1, burst)
	l := &sharedLimiter{s: s, key: s.prefix + ":rate:" + upstream, burst: burst,
		fallback: NewLocalLimiter(perSecond/float64(s.replicas), max(1, burst/s.replicas)).(localLimiter)}
	l.rate.Store(math.Float64bits(perSecond))
	s.mu.Lock()
	s.limiters[l.key] = l
	s.mu.Unlock()
	return l
}

// sharedLimiter is one GCRA bucket in Redis (redis_rate, on Redis's
// clock, so replicas' clocks need not agree). redis_rate stores it under
// "rate:" + key.
type sharedLimiter struct {
	s        *Shared
	key      string
	burst    int
	rate     atomic.Uint64 // float64 bits
	fallback localLimiter
}

func (l *sharedLimiter) limit() redis_rate.Limit {
	// One token per period of 1/rate seconds: any float rate, exactly.
	r := math.Float64frombits(l.rate.Load())
	return redis_rate.Limit{Rate: 1, Burst: l.burst, Period: time.Duration(float64(time.Second) / r)}
}

// Take asks Redis for n tokens, waiting for them while they come before
// ctx's deadline. A cost above the burst costs the burst, as locally:
// redis_rate would refuse it forever.
func (l *sharedLimiter) Take(ctx context.Context, n int) bool {
	n = min(max(1, n), l.burst)
	for range 1000 { // bounded: each round sleeps retryAfter (≥ 1 ms)
		if !l.s.up.Load() {
			return l.fallback.Take(ctx, n)
		}
		res, err := l.s.rl.AllowN(ctx, l.key, l.limit(), n)
		// An admitted call wrote the bucket; a refused one only read it.
		if !l.s.result(ctx, err, err == nil && res.Allowed > 0) {
			if ctx.Err() != nil {
				return false
			}
			return l.fallback.Take(ctx, n)
		}
		if res.Allowed > 0 {
			// Drain the fallback alike, so a switch to it (Redis slow for a
			// moment) does not hand out a fresh burst on top.
			l.fallback.l.AllowN(time.Now(), min(n, l.fallback.l.Burst()))
			return true
		}
		wait := max(res.RetryAfter, time.Millisecond)
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			return false
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
	}
	return false
}

// SetRate applies to the shared bucket (every replica that calls it) and
// to this replica's fallback share.
func (l *sharedLimiter) SetRate(perSecond float64) {
	if perSecond <= 0 {
		return
	}
	l.rate.Store(math.Float64bits(perSecond))
	l.fallback.SetRate(perSecond / float64(l.s.replicas))
}

// pauseCacheFor is how long a pause read from Redis is trusted: a message
// costs at most one extra round trip, and usually none.
const pauseCacheFor = 250 * time.Millisecond

// Pauses shares throttle pauses through Redis (key <prefix>:pause:<upstream>,
// unix ms, expiring with the pause). Each pause is kept locally too, so
// a Redis outage never forgets the ones this replica saw.
func (s *Shared) Pauses() Pauses { return &sharedPauses{s: s, cache: map[string]*cachedPause{}} }

type sharedPauses struct {
	s     *Shared
	local localPauses

	mu    sync.Mutex
	cache map[string]*cachedPause
}

type cachedPause struct {
	until time.Time
	read  time.Time
}

// pauseScript sets the pause unless a longer one is already there.
var pauseScript = redis.NewScript(`
local cur = tonumber(redis.call("GET", KEYS[1]) or "0")
if tonumber(ARGV[1]) > cur then
  redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
end
return 1`)

func (p *sharedPauses) key(upstream string) string { return p.s.prefix + ":pause:" + upstream }

func (p *sharedPauses) Pause(upstream string, until time.Time) {
	p.local.Pause(upstream, until)
	ttl := time.Until(until).Milliseconds()
	if ttl <= 0 || !p.s.up.Load() {
		return
	}
	ctx := context.Background()
	err := pauseScript.Run(ctx, p.s.rdb, []string{p.key(upstream)}, until.UnixMilli(), ttl).Err()
	// Not proof of a write: a longer pause already there is only read.
	p.s.result(ctx, err, false)
}

func (p *sharedPauses) PausedUntil(upstream string) time.Time {
	until := p.local.PausedUntil(upstream)
	now := time.Now()
	p.mu.Lock()
	c := p.cache[upstream]
	if c == nil {
		c = &cachedPause{}
		p.cache[upstream] = c
	}
	shared, fresh := c.until, now.Sub(c.read) < pauseCacheFor
	if !fresh && p.s.up.Load() {
		// Claim the refresh: other workers use the old value meanwhile.
		c.read = now
	}
	p.mu.Unlock()
	if !fresh && p.s.up.Load() {
		ctx := context.Background()
		v, err := p.s.rdb.Get(ctx, p.key(upstream)).Result()
		if p.s.result(ctx, err, false) {
			shared = time.Time{}
			if ms, perr := strconv.ParseInt(v, 10, 64); perr == nil {
				shared = time.UnixMilli(ms)
			}
			p.mu.Lock()
			c.until = shared
			p.mu.Unlock()
		}
	}
	if shared.After(until) {
		return shared
	}
	return until
}

var (
	_ Limiter = (*sharedLimiter)(nil)
	_ Pauses  = (*sharedPauses)(nil)
)
