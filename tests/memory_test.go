package tests

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/relaycar/relaycar/tools/rss/sinks"
)

// TestMemory_512MiBSixteenBigMessagesPerUpstream runs relaycar in a
// 512 MiB memory cgroup (the chart's default limit; memsw too, so swap
// cannot hide it) with 16 workers and max_message_bytes 25 MiB, submits 16
// messages of ~24 MB at once for each upstream type and requires all 16 at
// the upstream's fake, whole, with no OOM kill. The fakes run in this
// process, outside the cgroup, and hash and discard what they receive.
//
// The relay resolves spool.memory_budget auto from the cgroup (256 MiB) and
// sets GOMEMLIMIT to 90% of the limit itself; nothing here tunes either.
func TestMemory_512MiBSixteenBigMessagesPerUpstream(t *testing.T) {
	const (
		limit    = 512 << 20
		n        = 16
		size     = 24_000_000
		perType  = 240 * time.Second // generous: under -race the fakes decode 16 × 24 MB slowly
		overall  = 15 * time.Minute
		maxBytes = 25 << 20
	)
	deadline := time.Now().Add(overall)
	newMemCgroup(t, limit) // skips here, before building 24 MB, without cgroups
	msg := sinks.NewMessage(size)
	for _, kind := range sinks.Kinds {
		t.Run(kind, func(t *testing.T) {
			if time.Until(deadline) < 10*time.Second {
				t.Fatalf("no time left of the test's %s", overall)
			}
			cg := newMemCgroup(t, limit)
			sink, err := sinks.Start(kind, filepath.Join(t.TempDir(), "out"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(sink.Close)
			up := sink.Upstream("up", 0)
			// Sixteen 24 MB transfers at once under -race on a shared
			// 2-core machine can outlast the default 30 s; this test is
			// about memory, and a timeout would only resend.
			up["timeout"] = "180s"
			cfg, _ := yaml.Marshal(map[string]any{
				"listen":    map[string]any{"max_message_bytes": maxBytes},
				"spool":     map[string]any{"workers": n},
				"upstreams": []any{up},
				"routes":    []any{map[string]any{"name": "default", "upstreams": []string{"up"}}},
			})
			h := newHarness(t, string(cfg), withWrap(cg.wrap), withPlainBinary())
			p := h.current()
			pid := p.cmd.Process.Pid
			if !slices.Contains(cg.pids(), pid) {
				t.Fatalf("relaycar (pid %d) is not in the cgroup (%v)", pid, cg.pids())
			}

			start := time.Now()
			until := start.Add(perType)
			if deadline.Before(until) {
				until = deadline
			}
			var refused atomic.Int64
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for seq := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- submitBig(h.smtp, msg, seq, until, &refused)
				}()
			}
			// Sample while waiting: the process may die (OOM) at any time.
			var peakRSS int64
			for sink.Count() < n {
				peakRSS = max(peakRSS, procStatusKB(pid, "VmRSS")<<10)
				select {
				case <-p.done:
					p.stopping = true // reported here, not again by cleanup
					t.Fatalf("relaycar died after %d/%d deliveries: %v; cgroup %v; VmRSS peak seen %.1f MiB",
						sink.Count(), n, p.state, cg.stats(), mib(peakRSS))
				case <-time.After(100 * time.Millisecond):
				}
				if time.Now().After(until) {
					t.Fatalf("%d/%d messages at the %s fake after %s; cgroup %v; budget waits %v; sink errors %v",
						sink.Count(), n, kind, time.Since(start).Round(time.Millisecond), cg.stats(),
						h.metric("relaycar_memory_budget_waits_total"), sink.Errors())
				}
			}
			took := time.Since(start)
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			if err := sink.Verify(msg, sender, recipient, n); err != nil {
				t.Error(err)
			}
			h.waitSpoolEmpty(time.Until(until) + 5*time.Second)
			s := cg.stats()
			hwm := procStatusKB(pid, "VmHWM") << 10
			t.Logf("%s: %d × %.1f MB delivered in %s; cgroup peak %.1f MiB (incl. page cache), relaycar VmHWM %.1f MiB; "+
				"oom_kill %d; budget %.0f MiB, %v waits; %d submissions refused 4xx and retried; fake max in flight %d",
				kind, n, float64(msg.Size(sender, recipient, 0))/1e6, took.Round(time.Millisecond), mib(s.PeakBytes), mib(hwm),
				s.OOMKills, h.metric("relaycar_memory_budget_bytes")/(1<<20), h.metric("relaycar_memory_budget_waits_total"),
				refused.Load(), sink.MaxInFlight())
			if s.OOMKills != 0 {
				t.Errorf("oom_kill = %d, want 0", s.OOMKills)
			}
			if v := h.metric("relaycar_deliveries_total", "upstream=up", "result=delivered"); v != n {
				t.Errorf(`relaycar_deliveries_total{upstream="up",result="delivered"} = %v, want %d`, v, n)
			}
			// SendGrid and SMTP2GO hold 4x a message whole: sixteen at once
			// ask six times the budget, so the budget must have made some
			// wait. Without it a kind could pass here by luck of its fake's
			// speed (SendGrid's VmHWM went from 117 to 475 MiB of 512).
			if kind == "sendgrid" || kind == "smtp2go" {
				if w := h.metric("relaycar_memory_budget_waits_total"); w == 0 {
					t.Errorf("no memory budget waits for %d × 24 MB through %s, which holds 4x each in memory", n, kind)
				}
			}
		})
	}
}

// submitBig sends copy seq of m, retrying 4xx replies (451 4.3.1 when the
// memory budget is taken, as an MTA would) until until.
func submitBig(addr string, m *sinks.Message, seq int, until time.Time, refused *atomic.Int64) error {
	for {
		err := m.Send(addr, "tests.local", sender, recipient, seq)
		if err == nil {
			return nil
		}
		if c := smtpCode(err); c < 400 || c >= 500 || time.Now().After(until) {
			return fmt.Errorf("message %d: %w", seq, err)
		}
		refused.Add(1)
		time.Sleep(250 * time.Millisecond)
	}
}

// procStatusKB reads a "Key: N kB" line of /proc/PID/status; 0 if gone.
func procStatusKB(pid int, key string) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), key+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
