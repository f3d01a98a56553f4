// Package testwait holds the polling and SMTP-reply helpers shared by the
// in-process relay tests and the integration tests, so there is one
// definition of each.
package testwait

import (
	"errors"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// Interval is how often For polls its condition.
const Interval = 10 * time.Millisecond

// For polls cond until it is true and fails t if it is still false after
// timeout. cond is checked once more at the deadline, so a condition that
// becomes true just in time passes.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(Interval)
	}
}

// SMTPCode returns the reply code of an (possibly wrapped) *smtp.SMTPError,
// or 0 if err is nil or not an SMTP reply.
func SMTPCode(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}
