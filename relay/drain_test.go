package relay

import (
	"bytes"
	"context"
	"io/fs"
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
