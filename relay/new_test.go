package relay

import (
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// New's doc promises that a bad certificate fails before anything
// listens; it used to surface only in Run, after both sockets were bound.
func TestNew_BadCertificateFailsBeforeListening(t *testing.T) {
	t.Parallel()
	cfg := Default()
	dir := t.TempDir()
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	cfg.Listen.TLS = TLSConfig{CertFile: filepath.Join(dir, "missing.crt"), KeyFile: filepath.Join(dir, "missing.key")}
	r, err := New(&cfg, Deps{})
	if err == nil || !strings.Contains(err.Error(), "listen.tls") {
		t.Fatalf("New with a missing certificate = %v, %v; want a listen.tls error", r, err)
	}
}

// `relaycar queue` (through the files) and `relaycar drain` hold the spool
// lock while they work: a relay starting meanwhile waits for it instead of
// failing; while another relay holds it, Listen fails after lockWait.
func TestListen_WaitsForABrieflyHeldSpoolLock(t *testing.T) {
	t.Parallel()
	var released atomic.Bool
	tr := startRelayTB(t, []*recorder{{name: "a"}}, nil, nil, false, func(r *Relay) {
		other, err := spool.Open(r.cfg.Spool.Dir, spool.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := other.Lock(); err != nil {
			t.Fatal(err)
		}
		time.AfterFunc(300*time.Millisecond, func() { released.Store(true); other.Unlock() })
	})
	if !released.Load() {
		t.Fatal("Listen returned while the lock was still held")
	}

	second, err := New(tr.cfg, Deps{Logger: slog.New(slog.DiscardHandler), Upstreams: map[string]upstreams.Upstream{"a": &recorder{name: "a"}}})
	if err != nil {
		t.Fatal(err)
	}
	second.lockWait = 200 * time.Millisecond
	start := time.Now()
	if err := second.Listen(); !errors.Is(err, spool.ErrLocked) {
		t.Errorf("a second relay on the same spool: Listen = %v, want ErrLocked", err)
	}
	if took := time.Since(start); took < 200*time.Millisecond || took > 5*time.Second {
		t.Errorf("the second relay gave up after %s, want about lockWait (200ms)", took)
	}
}
