package relay

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"slices"
	"strings"
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
	now := time.Now()
	env := &Envelope{ID: spool.NewID(now), From: "app@example.com", Rcpts: slices.Clone(pending),
		ReceivedAt: now, Routes: []RouteState{{Route: "default", Pending: slices.Clone(pending)}}}
	w, err := sp.Create(env.ID)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: drained\r\n\r\nhello\r\n"))
	if err := w.Commit(env); err != nil {
		t.Fatal(err)
	}
	return sp, env
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
