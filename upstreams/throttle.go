package upstreams

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Throttle pause bounds: a provider that says "slow down" without saying
// how long gets throttleDefault; one that names an absurd time (a clock
// off by a day, a quota reset tomorrow) gets at most throttleMax, after
// which the next request asks again.
const (
	throttleDefault = time.Second
	throttleMax     = time.Hour
)

// retryAfter is when a throttled HTTP request may be repeated, from
// Retry-After (RFC 9110 section 10.2.3: seconds or an HTTP date) or
// X-RateLimit-Reset (Unix seconds, or seconds from now when small), else
// throttleDefault from now; never more than throttleMax from now.
func retryAfter(h http.Header, now time.Time) time.Time {
	at := now.Add(throttleDefault)
	if v := strings.TrimSpace(h.Get("Retry-After")); v != "" {
		if s, err := strconv.ParseInt(v, 10, 64); err == nil && s >= 0 {
			at = now.Add(time.Duration(min(s, int64(throttleMax/time.Second))) * time.Second)
		} else if t, err := http.ParseTime(v); err == nil {
			at = t
		}
	} else if v := strings.TrimSpace(h.Get("X-RateLimit-Reset")); v != "" {
		if s, err := strconv.ParseInt(v, 10, 64); err == nil && s >= 0 {
			if s > 100_000_000_000 {
				// Milliseconds since the epoch (as seconds it would be
				// the year 5138): some APIs send that.
				at = time.UnixMilli(s)
			} else if s > 1_000_000_000 {
				at = time.Unix(s, 0)
			} else {
				at = now.Add(time.Duration(min(s, int64(throttleMax/time.Second))) * time.Second)
			}
		}
	}
	if at.Before(now) {
		return now
	}
	if limit := now.Add(throttleMax); at.After(limit) {
		return limit
	}
	return at
}

// httpRetryAt is when an upstream that gave this HTTP answer may be called
// again, zero when the answer asks for no pause. A 429 always pauses (for
// retryAfter's default when no header says how long); a 503 only with a
// Retry-After, which RFC 9110 gives it for a planned wait: without one it
// is an outage, for the breaker to count.
func httpRetryAt(status int, h http.Header, now time.Time) time.Time {
	switch {
	case status == http.StatusTooManyRequests:
		return retryAfter(h, now)
	case status == http.StatusServiceUnavailable && h.Get("Retry-After") != "":
		return retryAfter(h, now)
	}
	return time.Time{}
}
