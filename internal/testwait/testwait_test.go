package testwait

import (
	"fmt"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func TestFor_ReturnsWhenTrue(t *testing.T) {
	t.Parallel()
	n := 0
	For(t, time.Second, "third poll", func() bool { n++; return n >= 3 })
	if n != 3 {
		t.Errorf("cond called %d times, want 3", n)
	}
}

func TestSMTPCode(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{fmt.Errorf("plain"), 0},
		{&smtp.SMTPError{Code: 451}, 451},
		{fmt.Errorf("wrapped: %w", &smtp.SMTPError{Code: 554}), 554},
	} {
		if got := SMTPCode(tc.err); got != tc.want {
			t.Errorf("SMTPCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
