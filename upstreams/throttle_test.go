package upstreams

import (
	"net/http"
	"testing"
	"time"
)

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		want time.Duration
	}{
		{"none", nil, throttleDefault},
		{"seconds", map[string]string{"Retry-After": "7"}, 7 * time.Second},
		{"zero", map[string]string{"Retry-After": "0"}, 0},
		{"HTTP date", map[string]string{"Retry-After": "Tue, 01 Dec 2026 12:00:30 GMT"}, 30 * time.Second},
		{"date in the past", map[string]string{"Retry-After": "Tue, 01 Dec 2026 11:00:00 GMT"}, 0},
		{"garbage", map[string]string{"Retry-After": "soon"}, throttleDefault},
		{"too far", map[string]string{"Retry-After": "86400"}, throttleMax},
		{"reset epoch", map[string]string{"X-RateLimit-Reset": "1796126445"}, 45 * time.Second},
		{"reset seconds", map[string]string{"X-RateLimit-Reset": "12"}, 12 * time.Second},
		{"Retry-After wins", map[string]string{"Retry-After": "3", "X-RateLimit-Reset": "60"}, 3 * time.Second},
	} {
		h := http.Header{}
		for k, v := range tc.hdr {
			h.Set(k, v)
		}
		if got := retryAfter(h, now).Sub(now); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
