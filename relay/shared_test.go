package relay

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/relaycar/relaycar/internal/testwait"
)

func sharedUp(t *testing.T, reg *prometheus.Registry) (float64, bool) {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "relaycar_rate_limit_shared_up" {
			return f.GetMetric()[0].GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// relaycar_rate_limit_shared_up follows Redis: 1 while it answers, 0
// while the replicas use their local share.
func TestShared_UpGaugeFollowsRedis(t *testing.T) {
	t.Parallel()
	m := miniredis.RunT(t)
	m.RequireAuth("s3cret")
	dir := t.TempDir()
	pw := filepath.Join(dir, "redis-password")
	os.WriteFile(pw, []byte("s3cret\n"), 0o600)
	cfg, err := Parse([]byte(`
spool: {dir: ` + filepath.Join(dir, "spool") + `}
redis: {address: "` + m.Addr() + `", password_file: ` + pw + `, replicas: 2}
upstreams:
  - {name: out, type: file, dir: ` + filepath.Join(dir, "out") + `, rate_limit: {per_second: 10, shared: true}}
routes:
  - {name: default, upstreams: [out]}
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	r, err := New(cfg, Deps{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.closeShared)
	if v, ok := sharedUp(t, reg); !ok || v != 1 {
		t.Fatalf("relaycar_rate_limit_shared_up = %v (present %v) with Redis up, want 1", v, ok)
	}
	m.Close()
	testwait.For(t, 5*time.Second, "shared_up 0 with Redis stopped", func() bool { v, _ := sharedUp(t, reg); return v == 0 })
	if err := m.Restart(); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "shared_up 1 with Redis back", func() bool { v, _ := sharedUp(t, reg); return v == 1 })
}

// Without a shared upstream there is no Redis client and no gauge (a 0
// would fire the chart's alert).
func TestShared_NoGaugeWithoutSharedUpstream(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := Default()
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	reg := prometheus.NewRegistry()
	r, err := New(&cfg, Deps{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	if r.shared != nil {
		t.Error("a Redis client without any rate_limit.shared")
	}
	if _, ok := sharedUp(t, reg); ok {
		t.Error("relaycar_rate_limit_shared_up exported without a shared limit")
	}
}
