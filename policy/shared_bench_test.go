package policy

import (
	"context"
	"net"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
)

// The cost of a rate limit per message (one recipient), local against
// shared: go test -run '^$' -bench Limiter ./policy/
func BenchmarkLimiter_Local(b *testing.B) {
	l := NewLocalLimiter(1e9, 1e6)
	ctx := context.Background()
	for b.Loop() {
		if !l.Take(ctx, 1) {
			b.Fatal("refused")
		}
	}
}

// BenchmarkLimiter_Redis runs against a real redis-server on loopback when
// one is installed, else miniredis (it says which).
func BenchmarkLimiter_Redis(b *testing.B) {
	addr := benchRedis(b)
	s := NewShared(SharedOptions{Address: addr, KeyPrefix: "bench"})
	b.Cleanup(func() { s.Close() })
	l := s.Limiter("up", 1e9, 1e6)
	ctx := context.Background()
	for b.Loop() {
		if !l.Take(ctx, 1) {
			b.Fatal("refused")
		}
	}
	if !s.Up() {
		b.Fatal("measured the fallback: Redis did not answer")
	}
}

func benchRedis(b *testing.B) string {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		b.Log("redis-server not installed: measuring miniredis")
		return miniredis.RunT(b).Addr()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
			c.Close()
			break
		}
		if i > 100 {
			b.Fatal("redis-server did not listen on " + addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Log("real redis-server " + strconv.Itoa(cmd.Process.Pid) + " on " + addr)
	return addr
}
