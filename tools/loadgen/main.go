// Command loadgen measures relaycar's durable accept rate and latency.
//
// It starts the relaycar binary on a temp spool, drives it with N
// concurrent SMTP sessions (each sending 2 KB messages over one
// connection, waiting for the 250 of each, which relaycar sends only after
// the fsynced spool commit), and reports accepted msgs/s, p50/p99 accept
// latency, the time until every message was delivered, and the relay's
// peak RSS. Everything binds 127.0.0.1; every run is bounded in messages
// and time.
//
//	go run ./tools/loadgen -bin bin/relaycar -upstream file -sessions 1,8,32
//	go run ./tools/loadgen -upstream smtp   # deliver to an in-process SMTP sink
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"
)

func main() {
	bin := flag.String("bin", "bin/relaycar", "relaycar binary (make build)")
	upstream := flag.String("upstream", "file", "file | smtp (an in-process go-smtp sink)")
	sessionsFlag := flag.String("sessions", "1,8,32", "concurrent SMTP sessions per run")
	perSession := flag.Int("messages", 0, "messages per run (default 1000 x sessions^0.5, max 6000)")
	size := flag.Int("size", 2048, "message size in bytes")
	maxTime := flag.Duration("max-time", 60*time.Second, "upper bound for one run")
	flag.Parse()

	var levels []int
	for _, s := range strings.Split(*sessionsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > 256 {
			fatal("bad -sessions %q", s)
		}
		levels = append(levels, n)
	}
	fmt.Printf("relaycar loadgen: %d-byte messages, upstream=%s, %s\n", *size, *upstream, machine())
	fmt.Printf("%-9s %9s %11s %9s %9s %9s %12s %9s\n", "sessions", "messages", "accepted/s", "p50", "p99", "max", "delivered/s", "peak RSS")
	for _, n := range levels {
		total := *perSession
		if total == 0 {
			total = min(6000, 1000*max(1, n/4+1))
		}
		res, err := runLevel(*bin, *upstream, n, total, *size, *maxTime)
		if err != nil {
			fatal("sessions=%d: %v", n, err)
		}
		fmt.Printf("%-9d %9d %11.0f %9s %9s %9s %12.0f %8.1fM\n", n, res.accepted, res.rate,
			ms(res.p50), ms(res.p99), ms(res.max), res.deliveredRate, float64(res.rssKB)/1024)
	}
}

type result struct {
	accepted      int
	rate          float64
	p50, p99, max time.Duration
	deliveredRate float64
	rssKB         int
}

func runLevel(bin, upstream string, sessions, total, size int, maxTime time.Duration) (*result, error) {
	dir, err := os.MkdirTemp("", "relaycar-load-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	smtpAddr, adminAddr := freeAddr(), freeAddr()

	var sink *smtp.Server
	var sinkCount atomic.Int64
	up := fmt.Sprintf("  - {name: out, type: file, dir: %s}\n", filepath.Join(dir, "outbox"))
	if upstream == "smtp" {
		sink = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{n: &sinkCount}, nil }))
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		sink.Domain = "sink.local"
		go sink.Serve(ln)
		defer sink.Close()
		up = fmt.Sprintf("  - {name: out, type: smtp, address: %s, tls: none}\n", ln.Addr())
	}
	cfg := fmt.Sprintf(`listen: {address: %s, max_recipients: 10}
admin: {address: %s}
spool: {dir: %s, workers: 16, retry: {initial: 1s, max: 5s, multiplier: 2}}
shutdown_grace: 10s
upstreams:
%sroutes:
  - {name: default, upstreams: [out]}
`, smtpAddr, adminAddr, filepath.Join(dir, "spool"), up)
	cfgPath := filepath.Join(dir, "relay.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}

	cmd := exec.Command(bin, "serve", "--config", cfgPath, "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
		}
	}()
	if err := waitReady(adminAddr, 10*time.Second); err != nil {
		return nil, err
	}

	body := message(size)
	ctx, cancel := context.WithTimeout(context.Background(), maxTime)
	defer cancel()
	lat := make([][]time.Duration, sessions)
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, sessions)
	start := time.Now()
	for s := range sessions {
		wg.Go(func() {
			c, err := smtp.Dial(smtpAddr)
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			if err := c.Hello("loadgen.local"); err != nil {
				errc <- err
				return
			}
			for next.Add(1) <= int64(total) && ctx.Err() == nil {
				t0 := time.Now()
				if err := c.SendMail("load@example.com", []string{"sink@example.net"}, strings.NewReader(body)); err != nil {
					errc <- err
					return
				}
				lat[s] = append(lat[s], time.Since(t0))
			}
			c.Quit()
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errc)
	for err := range errc {
		return nil, err
	}
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	res := &result{accepted: len(all), rate: float64(len(all)) / elapsed.Seconds()}
	if len(all) > 0 {
		res.p50, res.p99, res.max = all[len(all)/2], all[len(all)*99/100], all[len(all)-1]
	}
	// Delivery keeps going after the last accept: wait for an empty spool.
	for time.Since(start) < maxTime {
		if n, err := spoolMessages(adminAddr); err == nil && n == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	res.deliveredRate = float64(len(all)) / time.Since(start).Seconds()
	if upstream == "smtp" && sinkCount.Load() < int64(len(all)) {
		return nil, fmt.Errorf("sink received %d of %d messages within %s", sinkCount.Load(), len(all), maxTime)
	}
	res.rssKB = peakRSS(cmd.Process.Pid)
	return res, nil
}

func message(size int) string {
	var b strings.Builder
	b.WriteString("From: load@example.com\r\nTo: sink@example.net\r\nSubject: load test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
	line := "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.String()[:size-2] + "\r\n"
}

type sinkSession struct{ n *atomic.Int64 }

func (s *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *sinkSession) Data(r io.Reader) error {
	io.Copy(io.Discard, r)
	s.n.Add(1)
	return nil
}
func (s *sinkSession) Reset()        {}
func (s *sinkSession) Logout() error { return nil }

func waitReady(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("relay did not become ready")
}

func spoolMessages(addr string) (int, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "relaycar_spool_messages "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return int(f), err
		}
	}
	return 0, errors.New("relaycar_spool_messages not found")
}

// peakRSS is VmHWM, the resident set high-water mark, from /proc.
func peakRSS(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return kb
		}
	}
	return 0
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("%v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func machine() string {
	cpus := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		cpus = strings.Count(string(b), "processor\t:")
	}
	return fmt.Sprintf("%d CPUs", cpus)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d.Microseconds())/1000) }

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(1)
}
