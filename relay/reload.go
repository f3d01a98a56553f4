package relay

import "strings"

// ReloadFrom reads and validates path and applies it. A config with
// problems is logged, one problem per line with its YAML path, and the
// running config stays.
func (r *Relay) ReloadFrom(path string) error {
	// Read under the lock: SIGHUP and the poll must not apply an older
	// read of the file after a newer one.
	r.reloadMu.Lock()
	defer r.reloadMu.Unlock()
	cfg, err := LoadValid(path)
	if err != nil {
		r.metrics.reloadOK.Set(0)
		problems := strings.Split(err.Error(), "\n")
		r.log.Error("config reload failed; the running config stays", "config", path, "problems", len(problems))
		for _, p := range problems {
			r.log.Error("config problem", "problem", p)
		}
		return err
	}
	return r.reload(cfg)
}

// Reload applies a validated config between deliveries: upstreams whose
// settings are unchanged keep their breaker, limiter and pooled
// connections; changed ones are rebuilt and removed ones closed once their
// deliveries end; messages of a removed route go to the default route.
// Settings fixed for the process's life are logged, not applied. Safe to
// call from any goroutine (SIGHUP, the file poll); one runs at a time.
func (r *Relay) Reload(cfg *Config) error {
	r.reloadMu.Lock()
	defer r.reloadMu.Unlock()
	return r.reload(cfg)
}

func (r *Relay) reload(cfg *Config) error {
	if r.stopping.Load() {
		r.log.Warn("config reload ignored: shutting down")
		return nil
	}
	old := r.engine.Load()
	next, err := r.buildEngine(cfg, old)
	if err == nil {
		err = r.intake.reload(cfg.Listen)
		if err != nil {
			closeAll(dropped(next, old)) // built for nothing, never used
		}
	}
	if err != nil {
		r.metrics.reloadOK.Set(0)
		r.log.Error("config reload failed; the running config stays", "err", err)
		return err
	}
	for _, name := range restartOnly(old.cfg, cfg) {
		r.log.Warn("config setting changed but needs a restart; not applied", "setting", name)
	}
	r.metrics.precreate(next.order)
	r.engine.Store(next)
	if size := sizeLimit(cfg, next.router); size != r.size.Swap(size) {
		r.log.Info("message size limit changed", "size_limit", size)
	}
	r.quotas.reloaded(cfg.Upstreams)
	retire(old, next)
	d := diffEngines(old, next)
	if d.empty() {
		r.log.Info("config reloaded; nothing changed in upstreams or routes")
	} else {
		r.log.Info("config reloaded", d.logAttrs()...)
	}
	r.logRedirects(cfg)
	r.metrics.reloadOK.Set(1)
	r.metrics.reloadTime.Set(float64(r.now().UnixNano()) / 1e9)
	return nil
}

// ConfigFiles are the files the running config names (secrets, keys,
// certificates): with the config file itself, what the poll watches.
func (r *Relay) ConfigFiles() []string { return r.engine.Load().cfg.Files() }
