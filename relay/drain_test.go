package relay

import (
	"bufio"
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
	"github.com/relaycar/relaycar/relay/spool"
)

// badSectorFS fails every read past the first 4 KiB of a file, like a
// disk going bad in the middle of a message.
type badSectorFS struct{ spool.OS }

func (f badSectorFS) OpenFile(name string, flag int, perm fs.FileMode) (spool.File, error) {
	of, err := f.OS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return badSectorFile{of}, nil
}

type badSectorFile struct{ spool.File }

func (f badSectorFile) ReadAt(b []byte, off int64) (int, error) {
	const good = 4096
	if off+int64(len(b)) <= good {
		return f.File.ReadAt(b, off)
	}
	n := 0
	if off < good {
		n, _ = f.File.ReadAt(b[:good-off], off)
	}
	return n, syscall.EIO
}

// A spool read that fails halfway through DATA must not end the DATA:
// the peer would take a truncated message while the whole one stays here.
func TestDrain_SpoolReadErrorDoesNotSendATruncatedMessage(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sp, err := spool.Open(t.TempDir(), spool.Options{FS: badSectorFS{}})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	env := &Envelope{ID: spool.NewID(now), From: "app@example.com", Rcpts: []string{"b@example.net"},
		ReceivedAt: now, Routes: []RouteState{{Route: "default", Pending: []string{"b@example.net"}}}}
	w, err := sp.Create(env.ID)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: big\r\n\r\n"))
	w.Write(bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 2000))
	if err := w.Commit(env); err != nil {
		t.Fatal(err)
	}

	res := Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second}.Drain(context.Background(), sp, []*Envelope{env})
	if res.Drained != 0 || res.Left != 1 {
		t.Errorf("Drain = %+v, want the message left here", res)
	}
	if n := sink.Count(); n != 0 {
		t.Errorf("the peer accepted %d messages, want none (a truncated copy)", n)
	}
}

// drainEnv opens a spool and commits a small message to it whose route
// "default" has pending recipients, for the drain tests.
func drainEnv(t *testing.T, pending ...string) (*spool.Spool, *Envelope) {
	t.Helper()
	sp, err := spool.Open(t.TempDir(), spool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return sp, spoolMsg(t, sp, time.Now(), pending...)
}

// spoolMsg commits a small message for pending to sp.
func spoolMsg(t *testing.T, sp *spool.Spool, at time.Time, pending ...string) *Envelope {
	t.Helper()
	env := &Envelope{ID: spool.NewID(at), From: "app@example.com", Rcpts: slices.Clone(pending),
		ReceivedAt: at, Routes: []RouteState{{Route: "default", Pending: slices.Clone(pending)}}}
	w, err := sp.Create(env.ID)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: drained\r\n\r\nhello\r\n"))
	if err := w.Commit(env); err != nil {
		t.Fatal(err)
	}
	return env
}

// A message with recipients that failed for good and others still
// pending: the peer gets the pending ones, and the failed ones stay here
// as a dead letter with their reason, not removed with the rest.
func TestDrain_FailedRecipientsStayAsADeadLetter(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sp, env := drainEnv(t, "ok@example.net")
	env.Rcpts = append(env.Rcpts, "bad@example.net")
	env.Failures = []Failure{{Route: "default", Upstream: "smarthost", Class: spool.FailedRejected,
		Rcpts: []string{"bad@example.net"}, Reason: "550 5.1.1 no such user", At: time.Now().UTC()}}
	if err := sp.Update(env); err != nil {
		t.Fatal(err)
	}

	res := Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second}.Drain(context.Background(), sp, []*Envelope{env})
	sp.Close()
	if res.Drained != 1 || res.Recipients != 1 || res.Left != 0 || res.Dead != 1 {
		t.Errorf("Drain = %+v, want 1 drained (1 recipient) and 1 dead letter", res)
	}
	if msgs := sink.Messages(); len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"ok@example.net"}) {
		t.Errorf("peer got %+v, want one message for ok@ only", msgs)
	}
	dead, _ := sp.Dead()
	if len(dead) != 1 || dead[0].ID != env.ID || !strings.Contains(dead[0].DeadReason, "bad@example.net: 550 5.1.1 no such user") || dead[0].Pending() {
		t.Fatalf("dead letters = %+v, want %s with bad@'s reason and nothing pending", dead, env.ID)
	}
	if live, _ := sp.List(); len(live) != 0 {
		t.Errorf("live after the drain = %+v", live)
	}
}

// A route pinned after an ambiguous outcome is still handed over (the pod
// and its spool are going away), but not silently.
func TestDrain_PinnedRouteIsHandedOverWithAWarning(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sp, env := drainEnv(t, "b@example.net")
	env.Routes[0].Pinned = "ses"
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	res := Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second, Log: log}.Drain(context.Background(), sp, []*Envelope{env})
	sp.Close()
	if res.Drained != 1 || sink.Count() != 1 {
		t.Errorf("Drain = %+v, peer has %d: want the message handed over", res, sink.Count())
	}
	if out := logs.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "upstream=ses") || !strings.Contains(out, "twice") {
		t.Errorf("log = %s\nwant a warning naming the pinned upstream", out)
	}
}

// closingPeer is an SMTP peer whose first session misbehaves as a peer
// that is itself shutting down does; later sessions are well. mode says
// how the first session ends: "close" right after its first 250 (a
// relaycar closing idle sessions), "silent" after its first final dot
// with no reply, "421" answering every MAIL with 421 4.3.2 while keeping
// the connection (a relaycar draining). It counts the final dots it read.
// It serves until the test ends (at most 10 connections).
func closingPeer(t *testing.T, mode string) (addr string, count func() int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var mu sync.Mutex
	accepted := 0
	conns := 0
	go func() {
		for range 10 {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns++
			first := conns == 1
			mu.Unlock()
			go func(c net.Conn, first bool) {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				r := bufio.NewReader(c)
				w := func(s string) { c.Write([]byte(s + "\r\n")) }
				w("220 peer ESMTP")
				inData := false
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					line = strings.TrimRight(line, "\r\n")
					if inData {
						if line == "." {
							inData = false
							mu.Lock()
							accepted++
							mu.Unlock()
							if first && mode == "silent" {
								return
							}
							w("250 queued")
							if first && mode == "close" {
								return // like srv.Close() once no transaction is in flight
							}
						}
						continue
					}
					switch u := strings.ToUpper(line); {
					case strings.HasPrefix(u, "EHLO"):
						w("250-peer\r\n250 8BITMIME")
					case strings.HasPrefix(u, "MAIL") && first && mode == "421":
						w("421 4.3.2 Service shutting down, try again later")
					case strings.HasPrefix(u, "DATA"):
						inData = true
						w("354 go")
					case strings.HasPrefix(u, "QUIT"):
						w("221 bye")
						return
					default:
						w("250 ok")
					}
				}
			}(c, first)
		}
	}()

	return ln.Addr().String(), func() int { mu.Lock(); defer mu.Unlock(); return accepted }
}

// The message whose MAIL met the closed connection, or a 421, never
// reached the peer: it is handed over on a new connection, not left
// behind, and so is every message after it.
func TestDrain_RetriesAMessageAClosedConnectionNeverCarried(t *testing.T) {
	for _, mode := range []string{"close", "421"} {
		t.Run(mode, func(t *testing.T) { drainPastAClosingSession(t, mode) })
	}
}

func drainPastAClosingSession(t *testing.T, mode string) {
	addr, accepted := closingPeer(t, mode)
	sp, first := drainEnv(t, "b@example.net")
	envs := []*Envelope{first}
	for i := range 2 {
		envs = append(envs, spoolMsg(t, sp, time.Now().Add(time.Duration(i+1)*time.Millisecond), "c@example.net"))
	}
	res := Drainer{To: addr, Timeout: 5 * time.Second, ConnectFor: 2 * time.Second}.Drain(context.Background(), sp, envs)
	sp.Close()
	if res.Drained != 3 || res.Left != 0 || accepted() != 3 {
		t.Errorf("Drain = %+v, peer took %d: want all 3 handed over once", res, accepted())
	}
}

// A connection lost after the final dot went out may have carried the
// message: it is not sent again, and stays here.
func TestDrain_NoSecondTryAfterTheFinalDot(t *testing.T) {
	addr, dots := closingPeer(t, "silent")
	sp, env := drainEnv(t, "b@example.net")
	res := Drainer{To: addr, Timeout: 2 * time.Second, ConnectFor: time.Second}.Drain(context.Background(), sp, []*Envelope{env})
	sp.Close()
	if res.Left != 1 || res.Drained != 0 || dots() != 1 {
		t.Errorf("Drain = %+v, peer read %d messages: want it sent once and kept here", res, dots())
	}
}

// The hop count stops a message passed on without ever being tried; one
// that was tried before each drain (rollouts during an outage) goes on.
func TestDrain_HopsCountDrainsWithoutAnAttemptOnly(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sp, looping := drainEnv(t, "b@example.net")
	looping.Hops = maxDrainHops
	res := Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second}.Drain(context.Background(), sp, []*Envelope{looping})
	if res.Left != 1 || sink.Count() != 0 {
		t.Errorf("drained %d times without an attempt: Drain = %+v, peer has %d; want it kept", maxDrainHops, res, sink.Count())
	}
	looping.Attempts = 1 // this relay tried it
	res = Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second}.Drain(context.Background(), sp, []*Envelope{looping})
	sp.Close()
	msgs := sink.Messages()
	if res.Drained != 1 || len(msgs) != 1 || !bytes.Contains(msgs[0].Data, []byte(hopHeader+": 1\r\n")) {
		t.Errorf("tried, then drained: Drain = %+v, peer has %d messages; want one with %s: 1", res, len(msgs), hopHeader)
	}
}

// A staging route's message is handed over already redirected: whatever
// the peer makes of it, only the redirect addresses get it.
func TestDrain_RedirectRouteIsHandedOverRedirected(t *testing.T) {
	sink := testsmtp.Start(t, testsmtp.Options{})
	sp, env := drainEnv(t, "customer@example.net")
	env.Routes[0].Route = "staging"
	redirect := func(route string) []string {
		if route == "staging" {
			return []string{"qa@example.com"}
		}
		return nil
	}
	res := Drainer{To: sink.Addr, Timeout: 5 * time.Second, ConnectFor: time.Second, Redirect: redirect}.Drain(context.Background(), sp, []*Envelope{env})
	sp.Close()
	msgs := sink.Messages()
	if res.Drained != 1 || len(msgs) != 1 {
		t.Fatalf("Drain = %+v, peer has %d messages, want 1", res, len(msgs))
	}
	m := msgs[0]
	if !slices.Equal(m.To, []string{"qa@example.com"}) || !bytes.Contains(m.Data, []byte("X-Original-To: customer@example.net\r\n")) ||
		bytes.Contains(m.Data, []byte(routeHeader)) {
		t.Errorf("peer got rcpts %v and\n%s\nwant qa@ only, the original in X-Original-To, no route header", m.To, m.Data)
	}
}
