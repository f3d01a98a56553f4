package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The floor is only a floor if each 250 comes after the message is in the
// file (and, untestable here, synced): one that wrote nothing would look
// faster than any relay could be.
func TestFloorWritesEachMessageBeforeReplying(t *testing.T) {
	dir := t.TempDir()
	be, err := newFloorBackend(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	addr := serveFloor(t, be)
	for i, text := range []string{"first message, the longer of the two\r\n", "second\r\n"} {
		msg := "Subject: floor " + string(rune('a'+i)) + "\r\n\r\n" + text
		c, err := sendOne(addr, nil, "a@example.com", "b@example.net", msg, time.Now().Add(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		got, err := os.ReadFile(filepath.Join(dir, "floor.dat"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(got, []byte(msg)) {
			t.Fatalf("after message %d the file starts %q, want %q", i+1, got[:len(msg)], msg)
		}
		if len(got) != 1<<20 {
			t.Fatalf("file is %d bytes, want the preallocated %d (written over, not appended)", len(got), 1<<20)
		}
	}
}

// Without -dir the floor answers 250 and keeps nothing, in this process's
// working directory or anywhere else it could write.
func TestFloorDiscards(t *testing.T) {
	t.Chdir(t.TempDir())
	be, err := newFloorBackend("")
	if err != nil {
		t.Fatal(err)
	}
	addr := serveFloor(t, be)
	for i := range 3 {
		c, err := sendOne(addr, nil, "a@example.com", "b@example.net", "Subject: x\r\n\r\nbody\r\n", time.Now().Add(10*time.Second))
		if err != nil {
			t.Fatalf("message %d: %v, want 250", i+1, err)
		}
		c.Close()
	}
	if be.f != nil {
		t.Error("the discarding floor holds a file")
	}
	if ents, _ := os.ReadDir("."); len(ents) != 0 {
		t.Errorf("the discarding floor wrote %v", ents)
	}
}

func serveFloor(t *testing.T, be *floorBackend) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := floorServer(be)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Serve(ln)
	}()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return ln.Addr().String()
}
