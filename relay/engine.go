package relay

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// engine is what a reload replaces in one piece: a config and the
// upstreams, gates and router built from it. An attempt or an accept
// takes one engine and uses it to the end, so a swap falls between
// deliveries, never inside one.
type engine struct {
	cfg    *Config
	ups    map[string]upstreams.Upstream
	gates  map[string]*policy.Gate
	order  []*policy.Gate // config order, for the status page and metrics
	router *policy.Router

	// users is held shared by every attempt and accept using the engine;
	// a reload takes it exclusively before closing what the new engine
	// dropped, so no delivery loses its upstream mid-send.
	users sync.RWMutex
	// retired is closed once no attempt uses this engine or one before
	// it; earlier is the previous engine's. An upstream kept by one reload
	// and dropped by the next may still serve an attempt that began
	// before both.
	retired chan struct{}
	earlier <-chan struct{}
}

// acquire returns the current engine, held until release. The check
// after the lock closes the gap between loading the pointer and locking,
// in which a reload may have swapped and drained it.
func (r *Relay) acquire() *engine {
	for {
		e := r.engine.Load()
		e.users.RLock()
		if r.engine.Load() == e {
			return e
		}
		e.users.RUnlock()
	}
}

func (e *engine) release() { e.users.RUnlock() }

// buildEngine builds cfg's upstreams, gates and router. An upstream whose
// settings (secrets included) equal those in old keeps its adapter and
// gate: breaker and limiter state and pooled connections survive.
func (r *Relay) buildEngine(cfg *Config, old *engine) (*engine, error) {
	e := &engine{cfg: cfg, ups: map[string]upstreams.Upstream{}, gates: map[string]*policy.Gate{},
		retired: make(chan struct{})}
	if old != nil {
		e.earlier = old.retired
	}
	var built []upstreams.Upstream // new adapters, closed again on failure
	fail := func(err error) (*engine, error) {
		closeAll(built)
		return nil, err
	}
	for _, uc := range cfg.Upstreams {
		if old != nil {
			if oc, ok := old.upstreamConfig(uc.Name); ok && reflect.DeepEqual(oc, uc) {
				e.ups[uc.Name], e.gates[uc.Name] = old.ups[uc.Name], old.gates[uc.Name]
				e.order = append(e.order, old.gates[uc.Name])
				continue
			}
		}
		u, ok := r.injected[uc.Name]
		if !ok {
			var err error
			if u, err = upstreams.New(uc, r.udeps); err != nil {
				return fail(err)
			}
			built = append(built, u)
		}
		// Injected fakes are wrapped too, so relay tests see the edits.
		u = upstreams.Rewrite(u, uc)
		h := r.gateHooks(uc)
		if old != nil && old.gates[uc.Name] != nil {
			// A throttle pause stays with the upstream. Both records of
			// pauses are the relay's, so this copies only when
			// rate_limit.shared turned on or off moved it to the other.
			if until := old.gates[uc.Name].PausedUntil(); until.After(r.now()) {
				h.Pauses.Pause(uc.Name, until)
			}
		}
		g := policy.NewGate(u, uc, h)
		e.ups[uc.Name], e.gates[uc.Name] = u, g
		e.order = append(e.order, g)
	}
	router, err := policy.NewRouter(cfg.Routes, e.gates, r.rand)
	if err != nil {
		return fail(err)
	}
	e.router = router
	return e, nil
}

func (e *engine) upstreamConfig(name string) (upstreams.Config, bool) {
	for _, uc := range e.cfg.Upstreams {
		if uc.Name == name {
			return uc, true
		}
	}
	return upstreams.Config{}, false
}

// retire closes what old has and next does not, once no attempt uses old
// or any engine before it.
func retire(old, next *engine) {
	gone := dropped(old, next)
	go func() {
		if old.earlier != nil {
			<-old.earlier
		}
		old.users.Lock() // every attempt on old has finished
		close(old.retired)
		old.users.Unlock()
		closeAll(gone)
	}()
}

// dropped is what old has and next does not.
func dropped(old, next *engine) []upstreams.Upstream {
	var gone []upstreams.Upstream
	for name, u := range old.ups {
		if next.ups[name] != u {
			gone = append(gone, u)
		}
	}
	return gone
}

func closeAll(ups []upstreams.Upstream) {
	for _, u := range ups {
		if c, ok := u.(upstreams.Closer); ok {
			c.Close()
		}
	}
}

// engineDiff names what a reload changes, for its log line: upstream and
// route names only, never a value (secrets are settings too).
type engineDiff struct {
	added, changed, removed          []string
	routesAdded, routesChanged, gone []string
}

func diffEngines(old, next *engine) engineDiff {
	var d engineDiff
	upName := func(c upstreams.Config) string { return c.Name }
	routeName := func(c policy.RouteConfig) string { return c.Name }
	d.added, d.changed, d.removed = diffByName(old.cfg.Upstreams, next.cfg.Upstreams, upName)
	d.routesAdded, d.routesChanged, d.gone = diffByName(old.cfg.Routes, next.cfg.Routes, routeName)
	return d
}

// diffByName names the entries of next that old lacks or has with other
// settings, and the ones of old that next lacks, in config order.
func diffByName[T any](old, next []T, name func(T) string) (added, changed, removed []string) {
	before := make(map[string]T, len(old))
	for _, c := range old {
		before[name(c)] = c
	}
	after := make(map[string]bool, len(next))
	for _, c := range next {
		n := name(c)
		after[n] = true
		oc, ok := before[n]
		switch {
		case !ok:
			added = append(added, n)
		case !reflect.DeepEqual(oc, c):
			changed = append(changed, n)
		}
	}
	for _, c := range old {
		if !after[name(c)] {
			removed = append(removed, name(c))
		}
	}
	return added, changed, removed
}

// restartOnly lists the settings of next that differ from old but are
// fixed for the life of the process (sockets, the spool, worker count).
func restartOnly(old, next *Config) []string {
	var out []string
	check := func(name string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			out = append(out, name)
		}
	}
	check("listen.address", old.Listen.Address, next.Listen.Address)
	check("admin", old.Admin, next.Admin)
	check("spool.dir", old.Spool.Dir, next.Spool.Dir)
	check("spool.workers", old.Spool.Workers, next.Spool.Workers)
	check("spool.memory_budget", old.Spool.MemoryBudget, next.Spool.MemoryBudget)
	check("spool.max_bytes", old.Spool.MaxBytes, next.Spool.MaxBytes)
	check("redis", old.Redis, next.Redis)
	// The listener's reloadable parts (certificate, users, allowed
	// senders) are compared by intake.reload; the rest needs a restart.
	ol, nl := old.Listen, next.Listen
	ol.Address, nl.Address = "", ""
	ol.AllowedSenders, nl.AllowedSenders = nil, nil
	ol.MaxMessageBytes, nl.MaxMessageBytes = 0, 0 // SIZE follows a reload (sizeLimit)
	if (ol.Auth.UsersFile == "") == (nl.Auth.UsersFile == "") {
		ol.Auth, nl.Auth = AuthConfig{}, AuthConfig{}
	}
	if (ol.TLS.CertFile == "") == (nl.TLS.CertFile == "") {
		ol.TLS, nl.TLS = TLSConfig{}, TLSConfig{}
	}
	for _, f := range reflect.VisibleFields(reflect.TypeOf(ol)) {
		if !reflect.DeepEqual(reflect.ValueOf(ol).FieldByIndex(f.Index).Interface(), reflect.ValueOf(nl).FieldByIndex(f.Index).Interface()) {
			out = append(out, "listen."+yamlName(f))
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func yamlName(f reflect.StructField) string {
	if tag := f.Tag.Get("yaml"); tag != "" {
		name, _, _ := strings.Cut(tag, ",")
		return name
	}
	return f.Name
}

func (d engineDiff) empty() bool {
	return len(d.added)+len(d.changed)+len(d.removed)+len(d.routesAdded)+len(d.routesChanged)+len(d.gone) == 0
}

func (d engineDiff) logAttrs() []any {
	var a []any
	add := func(k string, v []string) {
		if len(v) > 0 {
			a = append(a, k, fmt.Sprint(v))
		}
	}
	add("upstreams_added", d.added)
	add("upstreams_changed", d.changed)
	add("upstreams_removed", d.removed)
	add("routes_added", d.routesAdded)
	add("routes_changed", d.routesChanged)
	add("routes_removed", d.gone)
	return a
}
