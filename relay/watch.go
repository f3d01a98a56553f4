package relay

import (
	"context"
	"crypto/sha256"
	"os"
	"time"
)

// Files lists every file the config names: what a change of must reload
// it (Kubernetes Secret and ConfigMap volumes change by swapping a ..data
// symlink, which watchers of the visible names miss after the first
// update, so these are polled by content).
func (c *Config) Files() []string {
	var out []string
	add := func(p string) {
		if p != "" {
			out = append(out, p)
		}
	}
	add(c.Listen.TLS.CertFile)
	add(c.Listen.TLS.KeyFile)
	add(c.Listen.Auth.UsersFile)
	// A rotated Redis password needs a restart: the reload says so.
	add(c.Redis.PasswordFile)
	for _, u := range c.Upstreams {
		for _, p := range u.Files() {
			add(p)
		}
	}
	return out
}

// Sums is the content of some files at one moment.
type Sums map[string]fileSum

// SumFiles reads paths now: serve takes this before it loads the config,
// so a change while the relay starts (a spool load can take seconds) is
// not lost to a baseline taken after it.
func SumFiles(paths []string) Sums { return checksums(paths) }

// WatchFiles calls changed whenever the content of any of paths() differs
// from since (nil: from the content at the call), then from the previous
// poll (a file appearing or vanishing counts), every interval until ctx
// ends. paths is asked at every poll, so a config that names new files is
// watched for them too.
func WatchFiles(ctx context.Context, since Sums, paths func() []string, interval time.Duration, changed func()) {
	sums := since
	if sums == nil {
		sums = checksums(paths())
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := checksums(paths())
		if !sameSums(sums, now) {
			// The baseline is what was read before the reload: a write
			// during it differs at the next poll and is applied then.
			changed()
		}
		sums = now
	}
}

// fileSum is a file's content hash, or missing.
type fileSum struct {
	sum     [32]byte
	missing bool
}

func checksums(paths []string) Sums {
	m := make(Sums, len(paths))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			m[p] = fileSum{missing: true}
			continue
		}
		m[p] = fileSum{sum: sha256.Sum256(b)}
	}
	return m
}

func sameSums(a, b Sums) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
