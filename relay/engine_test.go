package relay

import (
	"slices"
	"testing"
	"time"

	"github.com/relaycar/relaycar/policy"
)

// closingRecorder is a recorder whose adapter holds connections.
type closingRecorder struct {
	*recorder
	closed chan struct{}
}

func (c *closingRecorder) Close() error { close(c.closed); return nil }

// An upstream kept by one reload and dropped by the next is closed only
// once the attempts that began before both have finished.
func TestReload_DroppedUpstreamOutlivesEveryEngineUsingIt(t *testing.T) {
	t.Parallel()
	b := &closingRecorder{recorder: &recorder{name: "b"}, closed: make(chan struct{})}
	tr := startRelayDeps(t, []*recorder{{name: "a"}, b.recorder}, nil, nil, false, nil,
		func(d *Deps) { d.Upstreams["b"] = b })
	first := tr.acquire() // an attempt that began before both reloads

	keep := *first.cfg
	keep.Upstreams = slices.Clone(keep.Upstreams)
	keep.Upstreams[0].Timeout += time.Second // a is rebuilt, b kept
	if err := tr.Reload(&keep); err != nil {
		t.Fatal(err)
	}
	drop := keep
	drop.Upstreams = drop.Upstreams[:1]
	drop.Routes = []policy.RouteConfig{{Name: "default", Upstreams: []string{"a"}, Strategy: "failover"}}
	if err := tr.Reload(&drop); err != nil {
		t.Fatal(err)
	}
	select {
	case <-b.closed:
		t.Fatal("b was closed while an attempt on the first engine could still use it")
	case <-time.After(100 * time.Millisecond):
	}
	first.release()
	select {
	case <-b.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("b was not closed after the last attempt using it ended")
	}
}
