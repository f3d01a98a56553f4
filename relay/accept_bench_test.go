package relay

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/emersion/go-smtp"
)

// BenchmarkAccept drives the in-process relay with concurrent SMTP sessions
// sending 2 KB messages; each op is one message acknowledged with 250
// after its spool commit. Delivery goes to an upstream that accepts at once.
func BenchmarkAccept(b *testing.B) {
	for _, sessions := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("sessions=%d", sessions), func(b *testing.B) {
			benchAccept(b, sessions)
		})
	}
}

func benchAccept(b *testing.B, sessions int) {
	a := &recorder{name: "a"}
	tr := startRelayB(b, []*recorder{a})
	body := "From: load@example.com\r\nTo: sink@example.net\r\nSubject: load\r\n\r\n" +
		strings.Repeat("The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\r\n", 24)
	var n atomic.Int64
	b.SetParallelism((sessions + 1) / 2)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := smtp.Dial(tr.smtp)
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		for pb.Next() {
			if err := c.SendMail("load@example.com", []string{"sink@example.net"}, strings.NewReader(body)); err != nil {
				b.Error(err)
				return
			}
			n.Add(1)
		}
	})
	b.ReportMetric(float64(n.Load())/b.Elapsed().Seconds(), "msgs/s")
}
