package spool

import (
	"errors"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
)

// With MaxBytes the spool says it is full before its files reach the cap
// (past an emptyDir's sizeLimit the pod is evicted, spool and all), counts
// commits at once, and has room again once delivered files are gone.
func TestRoom_RefusesBeforeTheCapAndRecovers(t *testing.T) {
	t.Parallel()
	const cap, msg = 1 << 20, 100 << 10
	dir := filepath.Join(t.TempDir(), "spool")
	s, err := Open(dir, Options{Log: slog.New(slog.DiscardHandler), MaxBytes: cap})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	if err := s.Room(msg); err != nil {
		t.Fatalf("empty spool: %v", err)
	}
	var ids []string
	for i := 0; s.Room(msg) == nil; i++ {
		if i == 20 {
			t.Fatalf("still room after %d messages of %d bytes under a cap of %d", i, msg, cap)
		}
		id := NewID(at(i))
		put(t, s, testEnv(id), testBody(id, msg))
		ids = append(ids, id)
	}
	if n := len(ids); n < 7 || n > 9 {
		t.Errorf("full after %d messages of 100 KiB under 1 MiB, want 7-9 (the cap less 5 %% and one message)", n)
	}
	if err := s.Writable(msg); !errors.Is(err, ErrFull) {
		t.Errorf("Writable = %v, want ErrFull", err)
	}
	s.measure()
	if used := s.usage(); used > cap {
		t.Errorf("the files take %d bytes, over the cap %d", used, cap)
	}
	for _, id := range ids {
		if err := s.Remove(id); err != nil {
			t.Fatal(err)
		}
	}
	s.reapNow()
	s.measure()
	if err := s.Room(msg); err != nil {
		t.Errorf("after the deliveries: %v", err)
	}
}

// Without a cap nothing is measured or refused.
func TestRoom_NoCap(t *testing.T) {
	t.Parallel()
	s := newTestSpool(t)
	for i := range 3 {
		id := NewID(at(i))
		put(t, s, testEnv(id), testBody(id, 10<<10))
	}
	if err := s.Room(1 << 40); err != nil || s.used.Load() != 0 {
		t.Errorf("Room = %v with %d bytes counted, want no cap", err, s.used.Load())
	}
}

// Sessions that pass the check at MAIL together cannot take the spool
// past the cap: each byte is counted as it is written, and the message
// that would cross it fails with ErrFull and is not kept.
func TestRoom_ConcurrentMessagesStayUnderTheCap(t *testing.T) {
	t.Parallel()
	const msg = 1 << 20
	const cap = 4 * msg
	const sessions = 8
	s, err := Open(filepath.Join(t.TempDir(), "spool"), Options{Log: slog.New(slog.DiscardHandler), MaxBytes: cap})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	var ws []*Writer
	var ids []string
	for i := range sessions { // every MAIL before any DATA ends
		if err := s.Room(msg); err != nil {
			t.Fatalf("session %d refused at MAIL: %v", i, err)
		}
		id := NewID(at(i))
		w, err := s.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		ws, ids = append(ws, w), append(ids, id)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	kept := 0
	for i, w := range ws {
		wg.Go(func() {
			body := testBody(ids[i], msg)
			for off := 0; off < len(body); off += 64 << 10 { // as DATA streams it
				if _, err := w.Write(body[off:min(len(body), off+64<<10)]); err != nil {
					if !errors.Is(err, ErrFull) {
						t.Errorf("write: %v, want ErrFull", err)
					}
					w.Abort()
					return
				}
			}
			if err := w.Commit(testEnv(ids[i])); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			kept++
			mu.Unlock()
		})
	}
	wg.Wait()
	s.measure()
	if used := s.usage(); used > cap {
		t.Errorf("the spool's files take %d bytes, over the cap %d", used, cap)
	}
	if live, _ := s.List(); kept < 2 || len(live) != kept || s.inflight.Load() != 0 {
		t.Errorf("%d kept, %d listed, %d bytes still held: want at least 2, all listed, none held", kept, len(live), s.inflight.Load())
	}
}
