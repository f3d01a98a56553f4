package upstreams

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/fakes"
	"github.com/relaycar/relaycar/internal/testsmtp"
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
		{"reset epoch milliseconds", map[string]string{"X-RateLimit-Reset": "1796126445000"}, 45 * time.Second},
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

// throttleNow is the adapters' clock in these tests: RetryAt is then exact.
var throttleNow = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func throttleClock() time.Time { return throttleNow }

// throttleCase is one provider answer and the pause it must cause (0: none).
type throttleCase struct {
	name   string
	status int
	header map[string]string
	pause  time.Duration
}

// httpThrottleCases are the answers every HTTP adapter is tried with; the
// body is the provider's (each adapter parses its own).
func httpThrottleCases() []throttleCase {
	reset := strconv.FormatInt(throttleNow.Add(30*time.Second).Unix(), 10)
	return []throttleCase{
		{"429 Retry-After seconds", 429, map[string]string{"Retry-After": "7"}, 7 * time.Second},
		{"429 Retry-After date", 429, map[string]string{"Retry-After": "Tue, 01 Dec 2026 12:00:30 GMT"}, 30 * time.Second},
		{"429 X-RateLimit-Reset", 429, map[string]string{"X-RateLimit-Reset": reset, "X-RateLimit-Remaining": "0"}, 30 * time.Second},
		{"429 no header", 429, nil, throttleDefault},
		{"503 Retry-After", 503, map[string]string{"Retry-After": "5"}, 5 * time.Second},
		// No pause: an outage without a planned end is the breaker's.
		{"503 no header", 503, nil, 0},
		{"500", 500, map[string]string{"Retry-After": "5"}, 0},
		{"400", 400, nil, 0},
		{"401", 401, nil, 0},
	}
}

// checkPause asserts err's class and that RetryAt is exactly the pause.
func checkPause(t *testing.T, err error, status int, pause time.Duration) {
	t.Helper()
	if want := classifyHTTP(status); ClassOf(err) != want {
		t.Errorf("class %v (%v), want %v", ClassOf(err), err, want)
	}
	at := RetryAtOf(err)
	switch {
	case pause == 0 && !at.IsZero():
		t.Errorf("RetryAt %v for a non-throttle answer (%v)", at, err)
	case pause != 0 && !at.Equal(throttleNow.Add(pause)):
		t.Errorf("RetryAt %v, want now + %v (%v)", at, pause, err)
	}
}

func withHeader(r fakes.Reply, h map[string]string) fakes.Reply {
	if r.Header == nil {
		r.Header = map[string]string{}
	}
	for k, v := range h {
		r.Header[k] = v
	}
	return r
}

// SendGrid answers 429 with X-RateLimit-Reset in Unix seconds (its
// rate-limits page) and refuses every request until then.
func TestSendGrid_ThrottlePausesUntilReset(t *testing.T) {
	t.Parallel()
	for _, tc := range httpThrottleCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeSendGrid(t, sgTestKey)
			f.Script(sgAnswer{Status: tc.status, Header: tc.header, Body: `{"errors":[{"field":null,"message":"too many requests"}]}`})
			u, err := build(Config{Name: "sendgrid", Type: "sendgrid", APIKey: sgTestKey, Endpoint: f.URL, Timeout: 5 * time.Second},
				Deps{Now: throttleClock})
			if err != nil {
				t.Fatal(err)
			}
			_, err = u.Send(context.Background(), sgMessage("a@example.com", []string{"b@example.net"},
				"From: a@example.com\nTo: b@example.net\nSubject: s\n\nbody\n"))
			checkPause(t, err, tc.status, tc.pause)
		})
	}
}

// Mailgun's SDK returns *RateLimitedError for 429 (ResetAt from
// X-RateLimit-Reset) wrapping *UnexpectedResponseError, which keeps the
// response headers: Retry-After is read from them too.
func TestMailgun_ThrottlePausesUntilRetryAfter(t *testing.T) {
	t.Parallel()
	for _, tc := range httpThrottleCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
				return withHeader(fakes.JSON(tc.status, `{"message":"Too many requests"}`), tc.header)
			})
			u, err := newMailgun(Config{Name: "mailgun-test", Type: "mailgun", Region: "us", Domain: mailgunTestDomain,
				APIKey: mailgunTestKey, Endpoint: f.URL, Timeout: 5 * time.Second}, Deps{Now: throttleClock})
			if err != nil {
				t.Fatal(err)
			}
			_, err = u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			checkPause(t, err, tc.status, tc.pause)
		})
	}
}

// SMTP2GO documents no rate-limit headers; a 429 pauses for the default,
// and headers it may send are honoured.
func TestSMTP2GO_ThrottlePausesUntilRetryAfter(t *testing.T) {
	t.Parallel()
	for _, tc := range httpThrottleCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply {
				return withHeader(fakes.JSON(tc.status, `{"request_id":"r","data":{"error":"scripted failure"}}`), tc.header)
			})
			u, err := newSMTP2GO(Config{Name: "smtp2go-test", Type: "smtp2go", APIKey: smtp2goTestKey,
				Endpoint: f.URL, Timeout: 5 * time.Second}, Deps{Now: throttleClock})
			if err != nil {
				t.Fatal(err)
			}
			_, err = u.Send(context.Background(), apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			checkPause(t, err, tc.status, tc.pause)
		})
	}
}

// SES gives no Retry-After: the pause is ours, per kind of throttle.
func TestSES_ThrottlePauses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status    int
		code, msg string
		pause     time.Duration
	}{
		{429, "TooManyRequestsException", "Maximum sending rate exceeded.", throttleDefault},
		{400, "Throttling", "Maximum sending rate exceeded.", throttleDefault},
		{400, "ThrottlingException", "Rate exceeded", throttleDefault},
		// The rolling 24 h quota frees up only as a day-old send ages out.
		{400, "Throttling", "Daily message quota exceeded.", throttleMax},
		{400, "LimitExceededException", "Daily message quota exceeded.", throttleMax},
		// A resource-count limit, not a throttle: counted, not paused.
		{400, "LimitExceededException", "There are too many instances of the specified resource type.", 0},
		{400, "MessageRejected", "Illegal address", 0},
		{503, "ServiceUnavailable", "try later", 0},
	} {
		t.Run(tc.code+" "+tc.msg, func(t *testing.T) {
			t.Parallel()
			f := fakes.NewHTTP(t, func(int, fakes.Request) fakes.Reply { return sesError(tc.status, tc.code, tc.msg) })
			before := time.Now()
			_, err := newTestSES(t, f.URL).Send(context.Background(),
				apiTestMessage("alice@example.com", []string{"bob@example.net"}, []string{"bob@example.net"}))
			after := time.Now()
			at := RetryAtOf(err)
			if tc.pause == 0 {
				if !at.IsZero() {
					t.Errorf("RetryAt %v for %s (%v)", at, tc.code, err)
				}
				return
			}
			if ClassOf(err) != Transient {
				t.Errorf("class %v (%v), want transient", ClassOf(err), err)
			}
			if at.Before(before.Add(tc.pause)) || at.After(after.Add(tc.pause)) {
				t.Errorf("RetryAt is now + %v, want %v", at.Sub(before), tc.pause)
			}
			if n := len(f.Requests()); n != 1 {
				t.Errorf("%d requests: the SDK retried a throttle itself", n)
			}
		})
	}
}

// Rate replies of real servers pause the smarthost; other temporary
// replies are the retry schedule's and the breaker's.
func TestSMTP_ThrottleRepliesPause(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	c := Config{Name: "smarthost", Type: "smtp", Address: sink.Addr, TLS: "none"}
	c.ApplyDefaults()
	c.Timeout = 2 * time.Second
	u, err := newSMTP(c, Deps{Hostname: "relay.test", Now: throttleClock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	for _, tc := range []struct {
		at, enh string
		code    int
		msg     string
		pause   time.Duration
	}{
		{atMail, "4.7.28", 421, "Our system has detected an unusual rate of unsolicited mail originating from your IP address.", smtpRatePause}, // Gmail
		{atMail, "4.7.0", 421, "Try again later, closing connection.", smtpRatePause},                                                           // Gmail
		{atData, "4.7.500", 451, "Server busy. Please try again later.", smtpRatePause},                                                         // Outlook.com
		{atMail, "4.7.650", 451, "The mail server has been temporarily rate limited due to IP reputation.", smtpRatePause},                      // Microsoft
		{atMail, "4.4.5", 452, "Messages per second limit exceeded", smtpRatePause},
		{atMail, "", 454, "Throttling failure: Maximum sending rate exceeded.", throttleDefault}, // SES SMTP, per second
		{atMail, "", 454, "Throttling failure: Daily message quota exceeded.", throttleMax},      // SES SMTP, 24 h quota
		// Not throttles: no pause.
		{atMail, "4.3.2", 421, "Service shutting down", 0}, // a sick server: the breaker's
		{atRcpt, "4.4.2", 421, "Too many connections", 0},
		{atMail, "", 421, "Service not available", 0},
		{atMail, "4.3.0", 451, "Requested action aborted: local error", 0},
		{atRcpt, "4.2.1", 450, "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered.", 0}, // one mailbox's rate
		{atRcpt, "4.7.1", 451, "Greylisted, please try again later", 0},
		{atRcpt, "4.5.3", 452, "Too many recipients", 0},
		{atData, "4.7.1", 452, "Try again later", 0}, // a policy deferral without a rate: greylisting-like
		{atMail, "5.7.1", 550, "Relaying denied", 0},
	} {
		t.Run(fmt.Sprintf("%d %s %s at %s", tc.code, tc.enh, tc.msg, tc.at), func(t *testing.T) {
			sink.SetScript(replyAt(tc.at, testsmtp.Reply(tc.code, tc.enh, tc.msg)))
			_, err := u.Send(context.Background(), testMsg)
			if tc.code < 500 && ClassOf(err) != Transient {
				t.Errorf("class %v (%v), want transient", ClassOf(err), err)
			}
			at := RetryAtOf(err)
			switch {
			case tc.pause == 0 && !at.IsZero():
				t.Errorf("RetryAt %v for a non-throttle reply (%v)", at, err)
			case tc.pause != 0 && !at.Equal(throttleNow.Add(tc.pause)):
				t.Errorf("RetryAt is now + %v, want %v (%v)", at.Sub(throttleNow), tc.pause, err)
			}
		})
	}
}

// A 421 on a connection left idle is the server having closed it, not a
// throttle: the message goes out on a fresh connection, nothing paused.
func TestSMTP_StaleIdle421IsNotAThrottle(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	u := newTestSMTP(t, Config{Address: sink.Addr})
	t.Cleanup(func() { u.Close() })
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatal(err)
	}
	first := true
	sink.SetScript(testsmtp.Script{Mail: func(string) error {
		if first {
			first = false
			return testsmtp.Reply(421, "4.4.2", "Timeout, closing connection")
		}
		return nil
	}})
	if _, err := u.Send(context.Background(), testMsg); err != nil {
		t.Fatalf("421 on the idle connection: %v; want a retry on a fresh one", err)
	}
	if sink.Count() != 2 || sink.Conns() != 2 {
		t.Errorf("%d messages over %d connections; want 2 over 2", sink.Count(), sink.Conns())
	}
}
