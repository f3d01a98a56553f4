package policy

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	t.Parallel()
	r := RetryConfig{Initial: 30 * time.Second, Max: 15 * time.Minute, Multiplier: 2}
	zero := func() float64 { return 0 }
	almostOne := func() float64 { return 0.999999 }
	for _, tc := range []struct {
		attempt int
		r       RetryConfig
		rnd     func() float64
		want    time.Duration
	}{
		{1, r, zero, 30 * time.Second},
		{2, r, zero, time.Minute},
		{3, r, zero, 2 * time.Minute},
		{5, r, zero, 8 * time.Minute},
		{6, r, zero, 15 * time.Minute}, // 16m capped
		{60, r, zero, 15 * time.Minute},
		{5000, r, zero, 15 * time.Minute}, // +Inf must not overflow
		{0, r, zero, 30 * time.Second},
		// A fractional multiplier is computed in float64, not truncated.
		{3, RetryConfig{Initial: time.Second, Max: time.Hour, Multiplier: 1.5}, zero, 2250 * time.Millisecond},
		// Jitter takes at most a quarter off, never adds.
		{1, r, almostOne, 22500 * time.Millisecond},
		{60, r, almostOne, 11*time.Minute + 15*time.Second},
	} {
		got := Backoff(tc.attempt, tc.r, tc.rnd)
		if d := got - tc.want; d < -time.Millisecond || d > time.Millisecond {
			t.Errorf("Backoff(%d, %+v) = %v, want %v", tc.attempt, tc.r, got, tc.want)
		}
	}
}

func TestBackoff_NeverExceedsMaxAndSpreads(t *testing.T) {
	t.Parallel()
	r := RetryConfig{Initial: time.Second, Max: 10 * time.Second, Multiplier: 3}
	seen := map[time.Duration]bool{}
	for i := range 100 {
		x := float64(i) / 100
		d := Backoff(10, r, func() float64 { return x })
		if d > r.Max || d < r.Max*3/4 {
			t.Fatalf("Backoff = %v, want within [%v, %v]", d, r.Max*3/4, r.Max)
		}
		seen[d] = true
	}
	if len(seen) < 90 {
		t.Errorf("jitter produced only %d distinct waits out of 100", len(seen))
	}
}
