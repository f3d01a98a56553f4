package atomicfile

import (
	"testing"
	"time"
)

// Observe sees what callers said they wrote, and a slow Observe (a log
// write to a stuck pipe) holds up no one but the caller that ran the sync.
func TestGroupSyncObserve(t *testing.T) {
	type seen struct {
		took  time.Duration
		wrote int64
	}
	observed := make(chan seen, 4)
	release := make(chan struct{})
	d := &GroupSync{Dir: t.TempDir()}
	d.Observe = func(took time.Duration, wrote int64) {
		observed <- seen{took, wrote}
		<-release
	}

	d.Wrote(1000)
	d.Wrote(24)
	first := make(chan error, 1)
	go func() { first <- d.Sync() }()
	got := <-observed // the first sync is done and its Observe is blocked
	if got.wrote != 1024 || got.took <= 0 {
		t.Errorf("Observe got %+v, want 1024 bytes and a duration", got)
	}

	d.Wrote(7)
	second := make(chan error, 1)
	go func() { second <- d.Sync() }()
	select {
	case got := <-observed:
		if got.wrote != 7 {
			t.Errorf("second sync observed %d bytes, want 7 (the first one's were counted)", got.wrote)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a second sync could not run while the first sync's Observe was blocked")
	}
	close(release)
	for _, c := range []chan error{first, second} {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	if n := d.Syncs(); n != 2 {
		t.Errorf("%d syncs, want 2", n)
	}
}
