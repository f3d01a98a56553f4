// Command rss measures relaycar's peak resident memory delivering one large
// message through each upstream type, against the streaming fakes of
// tools/rss/sinks on 127.0.0.1:
//
//	go run ./tools/rss [-size 50000000] [-types smtp,file,ses,sendgrid,mailgun,smtp2go] [-bin PATH]
//
// For each type it starts a fresh relaycar (built from ./cmd/relaycar
// unless -bin is given) on a fresh spool, submits one message of -size
// bytes, waits until the fake has it whole and the spool is empty, and
// reads the process's VmHWM from /proc/PID/status. It prints one table row
// per type: upstream | message MB | peak RSS MB | ratio (peak RSS /
// message size) | idle RSS MB (VmRSS once ready, before the message). MB
// are 10^6 bytes.
//
// SES, SendGrid and Mailgun refuse max_message_bytes above their provider
// limits (28 MiB raw for SES, whose 40 MB counts base64; 30 MiB; 25 MiB),
// as `relaycar check` does, so for those the message is just under the
// limit (limit - 64 KiB, the room left for the Received header) when -size
// is larger; the row says so. smtp, file and smtp2go take -size as is.
//
// The relay runs without a container limit unless the tool itself runs in
// one, so the Go runtime's soft limit stays unset (for one message it would
// not bind under the chart's 512 MiB anyway).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/relaycar/relaycar/tools/rss/sinks"
)

const (
	from = "app@example.com"
	to   = "user@example.net"
)

func main() {
	size := flag.Int64("size", 50_000_000, "message size in bytes")
	types := flag.String("types", strings.Join(sinks.Kinds, ","), "upstream types to measure, comma-separated")
	bin := flag.String("bin", "", "relaycar binary (default: go build ./cmd/relaycar)")
	timeout := flag.Duration("timeout", 2*time.Minute, "bound per upstream type")
	keep := flag.Bool("keep", false, "keep the work directory (relay.yaml, relaycar.log per type) and print its path")
	flag.Parse()

	tmp, err := os.MkdirTemp("", "relaycar-rss-")
	if err != nil {
		fatal("%v", err)
	}
	if *keep {
		fmt.Fprintln(os.Stderr, "rss: work directory", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}
	if *bin == "" {
		*bin = filepath.Join(tmp, "relaycar")
		cmd := exec.Command("go", "build", "-o", *bin, "./cmd/relaycar")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fatal("go build ./cmd/relaycar (run from the module root): %v", err)
		}
	}

	msgs := map[int64]*sinks.Message{}
	fmt.Printf("%-9s | %10s | %11s | %5s | %11s | %s\n", "upstream", "message MB", "peak RSS MB", "ratio", "idle RSS MB", "note")
	fmt.Println("----------|------------|-------------|-------|-------------|-----")
	failed := false
	for _, kind := range strings.Split(*types, ",") {
		kind = strings.TrimSpace(kind)
		n, note := *size, ""
		if limit, ok := sinks.ProviderMax[kind]; ok && n > limit-64<<10 {
			n = limit - 64<<10
			note = fmt.Sprintf("provider limit %d MiB: message just under it", limit>>20)
		}
		if msgs[n] == nil {
			msgs[n] = sinks.NewMessage(n)
		}
		r, err := measure(*bin, filepath.Join(tmp, kind), kind, msgs[n], *timeout)
		if err != nil {
			fmt.Printf("%-9s | %10.1f | %11s | %5s | %11s | FAILED: %v\n", kind, float64(n)/1e6, "-", "-", "-", err)
			failed = true
			continue
		}
		fmt.Printf("%-9s | %10.1f | %11.1f | %5.2f | %11.1f | %s\n", kind, float64(r.size)/1e6, float64(r.peak)/1e6,
			float64(r.peak)/float64(r.size), float64(r.idle)/1e6, note)
	}
	if failed {
		os.Exit(1)
	}
}

type result struct{ size, peak, idle int64 }

// measure runs one relaycar delivering one copy of m to a fresh sink.
func measure(bin, dir, kind string, m *sinks.Message, timeout time.Duration) (result, error) {
	var res result
	deadline := time.Now().Add(timeout)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return res, err
	}
	sink, err := sinks.Start(kind, filepath.Join(dir, "out"))
	if err != nil {
		return res, err
	}
	defer sink.Close()
	res.size = m.Size(from, to, 0)
	smtpAddr, adminAddr := freeAddr(), freeAddr()
	var upMax int64
	if limit, ok := sinks.ProviderMax[kind]; ok {
		upMax = limit
	}
	cfg, _ := yaml.Marshal(map[string]any{
		"listen":         map[string]any{"address": smtpAddr, "max_message_bytes": max(25<<20, res.size+1<<20)},
		"admin":          map[string]any{"address": adminAddr},
		"spool":          map[string]any{"dir": filepath.Join(dir, "spool"), "retry": map[string]any{"initial": "200ms", "max": "1s", "multiplier": 2}},
		"shutdown_grace": "2s",
		"upstreams":      []any{sink.Upstream("up", upMax)},
		"routes":         []any{map[string]any{"name": "default", "upstreams": []string{"up"}}},
	})
	cfgPath := filepath.Join(dir, "relay.yaml")
	if err := os.WriteFile(cfgPath, cfg, 0o600); err != nil {
		return res, err
	}
	logf, err := os.Create(filepath.Join(dir, "relaycar.log"))
	if err != nil {
		return res, err
	}
	defer logf.Close()
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "serve", "--config", cfgPath)
	cmd.Dir = dir
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "RELAYCAR_") })
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return res, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	pid := cmd.Process.Pid
	hc := &http.Client{Timeout: 5 * time.Second}
	if err := poll(done, deadline, 10*time.Second, "GET /readyz 200", func() bool {
		resp, err := hc.Get("http://" + adminAddr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}); err != nil {
		return res, fmt.Errorf("%v (log %s)", err, logf.Name())
	}
	res.idle = statusBytes(pid, "VmRSS")
	if err := m.Send(smtpAddr, "rss.local", from, to, 0); err != nil {
		return res, fmt.Errorf("submitting: %v", err)
	}
	if err := poll(done, deadline, timeout, "the message at the fake and an empty spool", func() bool {
		return sink.Count() == 1 && spoolMessages(hc, adminAddr) == 0
	}); err != nil {
		return res, fmt.Errorf("%v (log %s)", err, logf.Name())
	}
	res.peak = statusBytes(pid, "VmHWM")
	if err := sink.Verify(m, from, to, 1); err != nil {
		return res, err
	}
	return res, nil
}

func poll(done <-chan struct{}, deadline time.Time, d time.Duration, what string, cond func() bool) error {
	until := time.Now().Add(d)
	if deadline.Before(until) {
		until = deadline
	}
	for !cond() {
		select {
		case <-done:
			return fmt.Errorf("relaycar exited waiting for %s", what)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(until) {
			return fmt.Errorf("timed out waiting for %s", what)
		}
	}
	return nil
}

// spoolMessages reads relaycar_spool_messages; -1 when unreadable.
func spoolMessages(hc *http.Client, admin string) float64 {
	resp, err := hc.Get("http://" + admin + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	s := bufio.NewScanner(resp.Body)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "relaycar_spool_messages "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// statusBytes reads a "Key: N kB" line of /proc/PID/status.
func statusBytes(pid int, key string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10
		}
	}
	return 0
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "rss: "+format+"\n", args...)
	os.Exit(1)
}
