package upstreams

import (
	"fmt"

	"github.com/relaycar/relaycar/internal/atomicfile"
	"log/slog"
	"net/http"
	"time"
)

// Deps are the process-wide things an adapter needs; tests pass their own.
type Deps struct {
	Logger *slog.Logger
	// Hostname is the EHLO name used towards SMTP upstreams.
	Hostname string
	Now      func() time.Time
	// SyncFor returns the group syncer for a directory's file system, so
	// the file upstream shares syncs with the spool when both live on one
	// file system. Nil means a syncer of its own.
	SyncFor func(dir string) *atomicfile.GroupSync
	// Memory is reserved by adapters that hold a whole message in memory
	// (SMTP2GO, SendGrid). Nil means no budget.
	Memory Memory
	// Deliveries is how many sends may run at once (spool.workers); the
	// smtp upstream keeps as many idle connections.
	Deliveries int
}

func (d Deps) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Logger
}

func (d Deps) now() func() time.Time {
	if d.Now == nil {
		return time.Now
	}
	return d.Now
}

func (d Deps) syncFor(dir string) *atomicfile.GroupSync {
	if d.SyncFor != nil {
		return d.SyncFor(dir)
	}
	return &atomicfile.GroupSync{Dir: dir}
}

func (d Deps) httpClient(timeout time.Duration) *http.Client {
	c := &http.Client{}
	// The timeout covers the whole exchange, reading the body included.
	c.Timeout = timeout
	c.Transport = apiLimitTransport{base: http.DefaultTransport, max: apiMaxResponseBytes}
	// A redirect to another host would carry API-key headers along (Go
	// strips only Authorization and Cookie); providers do not redirect the
	// send APIs, so treat a 3xx as the answer.
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return c
}

// New builds the adapter for c.Type from its entry in kinds. It applies
// the defaults and the kind's own checks itself; c should have passed
// Validate.
func New(c Config, d Deps) (Upstream, error) {
	u, err := build(c, d)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", c.Name, err)
	}
	return u, nil
}
