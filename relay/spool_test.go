package relay

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

func newTestSpool(t *testing.T) *Spool {
	t.Helper()
	s, err := OpenSpool(filepath.Join(t.TempDir(), "spool"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func testEnv(id string) *Envelope {
	return &Envelope{ID: id, From: "a@example.com", Rcpts: []string{"b@example.net"}, MessageID: "<m@x>",
		ReceivedAt: time.Now().UTC(), NextAttempt: time.Now().UTC(),
		Routes: []RouteState{{Route: "default", Pending: []string{"b@example.net"}}}}
}

// dirNames lists a directory, sorted, so tests assert the disk itself.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out
}

func TestSpool_PutIsDurableAndPrivate(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	if err := s.Put(testEnv(id), []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	want := []string{"dead", id + ".eml", id + ".json"}
	sort.Strings(want)
	if got := dirNames(t, s.dir); !slices.Equal(got, want) {
		t.Fatalf("spool = %v, want %v", got, want)
	}
	for _, name := range []string{id + ".eml", id + ".json"} {
		fi, _ := os.Stat(filepath.Join(s.dir, name))
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
	if fi, _ := os.Stat(s.dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("spool dir mode %v, want 0700", fi.Mode().Perm())
	}
	envs, broken, err := s.Load()
	if err != nil || broken != 0 || len(envs) != 1 || envs[0].ID != id {
		t.Fatalf("Load = %v, %d, %v", envs, broken, err)
	}
}

func TestSpool_IDsSortByTime(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var ids []string
	for i := range 50 {
		ids = append(ids, NewID(t0.Add(time.Duration(i)*time.Microsecond*997)))
	}
	if !slices.IsSorted(ids) {
		t.Errorf("ids not time-sorted: %v", ids)
	}
	for _, id := range ids {
		if !validID(id) || strings.HasPrefix(id, atomicfile.TempPrefix) {
			t.Errorf("bad id %q", id)
		}
	}
}

// Models a crash between writing the body and committing the envelope (or
// an envelope lost to corruption after its 250), a torn envelope, and a
// crash in the middle of dead-lettering.
func TestSpool_LoadRecoversAfterCrash(t *testing.T) {
	s := newTestSpool(t)
	ok, orphan, broken, half := NewID(time.Now()), NewID(time.Now()), NewID(time.Now()), NewID(time.Now())
	for _, id := range []string{ok, half} {
		if err := s.Put(testEnv(id), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(s.dir, orphan+".eml"), []byte("maybe acknowledged"), 0o600)
	os.WriteFile(filepath.Join(s.dir, broken+".eml"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(s.dir, broken+".json"), []byte(`{"id": "`+broken), 0o600)
	os.WriteFile(filepath.Join(s.dir, ".tmp-123"), []byte("partial"), 0o600)
	// Dead envelope written, body not yet moved, live envelope not removed.
	env := testEnv(half)
	env.DeadReason = "rejected"
	js, _ := encodeEnvelope(env)
	os.WriteFile(filepath.Join(s.dead, half+".json"), js, 0o600)

	envs, nBroken, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	// A body without its envelope is quarantined, not deleted: nothing
	// tells a torn Put from an acknowledged message whose .json was lost.
	if len(envs) != 1 || envs[0].ID != ok || nBroken != 2 {
		t.Fatalf("Load = %d envs (%v), %d broken, want 1 and 2", len(envs), envs, nBroken)
	}
	want := []string{broken + ".eml.broken", broken + ".json.broken", "dead", ok + ".eml", ok + ".json", orphan + ".eml.broken"}
	sort.Strings(want)
	if got := dirNames(t, s.dir); !slices.Equal(got, want) {
		t.Errorf("spool after Load = %v, want %v", got, want)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{half + ".eml", half + ".json"}) {
		t.Errorf("dead after Load = %v", got)
	}
}

// Models an operator (or a backup tool) leaving files in dead/: the
// dead-letter gauge must count what /api/dead lists, or alerts fire on
// messages nobody can find.
func TestSpool_CountDeadMatchesListing(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	env := testEnv(id)
	s.Put(env, []byte("body"))
	if err := s.Bury(env, "rejected", time.Now()); err != nil {
		t.Fatal(err)
	}
	other := testEnv(NewID(time.Now()))
	js, _ := encodeEnvelope(other)
	for name, data := range map[string][]byte{
		"notes.json":      []byte("operator notes, not an envelope"),
		"copy of x.json":  js,           // invalid id in the name
		"a0renamed.json":  js,           // valid name, envelope of another id
		".tmp-123.json":   js,           // in-progress write
		id + ".json.bak":  js,           // not .json
		"empty.json":      nil,          // torn
		"aaaaaaaaaa.json": []byte("{}"), // no id
	} {
		if err := os.WriteFile(filepath.Join(s.dead, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	dead, err := s.Dead()
	if err != nil || len(dead) != 1 || dead[0].ID != id {
		t.Fatalf("Dead = %v, %v; want only %s", dead, err, id)
	}
	if n := s.CountDead(); n != len(dead) {
		t.Errorf("CountDead = %d, /api/dead lists %d", n, len(dead))
	}
}

func TestSpool_BuryResurrectDrop(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	env := testEnv(id)
	s.Put(env, []byte("body"))
	env.Failures = []Failure{{Route: "default", Class: "rejected", Rcpts: env.Routes[0].Pending, Reason: "550 5.1.1 no such user"}}
	env.Routes[0].Pending = nil
	if err := s.Bury(env, "b@example.net: 550 5.1.1 no such user", time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
		t.Errorf("spool after Bury = %v", got)
	}
	dead, _ := s.Dead()
	if len(dead) != 1 || dead[0].DeadReason == "" || dead[0].DeadAt == nil || s.CountDead() != 1 {
		t.Fatalf("Dead = %+v", dead)
	}
	back, err := s.Resurrect(id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(back.Routes[0].Pending, []string{"b@example.net"}) || len(back.Failures) != 0 || back.DeadReason != "" {
		t.Errorf("resurrected = %+v", back)
	}
	if b, _ := s.ReadData(id); string(b) != "body" {
		t.Errorf("body after resurrect = %q", b)
	}
	if err := s.Drop(id); err != nil {
		t.Fatal(err)
	}
	if err := s.Drop(id); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("second Drop = %v, want not exist", err)
	}
	if err := s.Drop("../../etc/passwd"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Drop(path) = %v, want refused", err)
	}
}

// failingFS fails writes after n bytes with ENOSPC, like a full disk.
type failingFS struct{ after int }

type failingFile struct {
	*os.File
	left int
}

func (f failingFS) CreateTemp(dir, pattern string) (atomicfile.File, error) {
	of, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	return &failingFile{File: of, left: f.after}, nil
}

func (f failingFS) Create(path string, perm os.FileMode) (atomicfile.File, error) {
	of, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return nil, err
	}
	return &failingFile{File: of, left: f.after}, nil
}

// switchFS fails like a full disk while full is set; tests flip it while
// the relay runs.
type switchFS struct{ full atomic.Bool }

func (s *switchFS) fs() atomicfile.FS {
	if s.full.Load() {
		return failingFS{after: 0}
	}
	return atomicfile.OS{}
}
func (s *switchFS) CreateTemp(dir, pattern string) (atomicfile.File, error) {
	return s.fs().CreateTemp(dir, pattern)
}
func (s *switchFS) Create(path string, perm os.FileMode) (atomicfile.File, error) {
	return s.fs().Create(path, perm)
}

func (f *failingFile) Write(b []byte) (int, error) {
	if len(b) > f.left {
		n, _ := f.File.Write(b[:f.left])
		f.left = 0
		return n, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	f.left -= len(b)
	return f.File.Write(b)
}

func TestSpool_DiskFullKeepsNothing(t *testing.T) {
	for _, after := range []int{0, 10, 200} { // body fails / body ok, envelope fails
		t.Run(fmt.Sprint(after), func(t *testing.T) {
			s := newTestSpool(t)
			s.fs = failingFS{after: after}
			err := s.Put(testEnv(NewID(time.Now())), bytes.Repeat([]byte("x"), 100))
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("Put = %v, want ENOSPC", err)
			}
			if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
				t.Errorf("spool after failed Put = %v, want nothing kept", got)
			}
		})
	}
}

// Many sessions committing at once share directory fsyncs; every Put still
// returns only after its own files are durable.
func TestSpool_ConcurrentPuts(t *testing.T) {
	s := newTestSpool(t)
	var wg sync.WaitGroup
	ids := make([]string, 64)
	for i := range ids {
		ids[i] = NewID(time.Now())
		wg.Go(func() {
			if err := s.Put(testEnv(ids[i]), []byte(fmt.Sprintf("msg %d", i))); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	envs, _, err := s.Load()
	if err != nil || len(envs) != len(ids) {
		t.Fatalf("Load = %d envs, %v", len(envs), err)
	}
	// 64 commits racing for the directory must share fsyncs.
	if s.sync.Syncs() >= uint64(len(ids)) {
		t.Errorf("%d directory fsyncs for %d concurrent commits: no group commit", s.sync.Syncs(), len(ids))
	}
	t.Logf("%d directory fsyncs for %d commits", s.sync.Syncs(), len(ids))
}

func TestSpool_Lock(t *testing.T) {
	s := newTestSpool(t)
	if err := s.Lock(); err != nil {
		t.Fatal(err)
	}
	other, _ := OpenSpool(s.dir, slog.New(slog.DiscardHandler))
	if err := other.Lock(); !errors.Is(err, ErrLocked) {
		t.Errorf("second Lock = %v, want ErrLocked", err)
	}
	if !other.Locked() {
		t.Error("Locked() = false while another holder has it")
	}
	s.Unlock()
	if other.Locked() {
		t.Error("Locked() = true after Unlock")
	}
}

// BenchmarkSpoolPut measures durable commits of 2 KB messages with 1, 8
// and 32 concurrent writers (sessions).
func BenchmarkSpoolPut(b *testing.B) {
	for _, writers := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) { benchPut(b, writers) })
	}
}

func benchPut(b *testing.B, writers int) {
	s, _ := OpenSpool(b.TempDir(), slog.New(slog.DiscardHandler))
	data := bytes.Repeat([]byte("0123456789abcdef\r\n"), 2048/18)
	b.SetBytes(int64(len(data)))
	b.SetParallelism((writers + 1) / 2) // GOMAXPROCS=2 here; SetParallelism multiplies it
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := s.Put(testEnv(NewID(time.Now())), data); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// Models an operator retrying a dead letter while the disk is full, and a
// crash in the middle of that retry: the message must stay dead, body and
// all, never vanish.
func TestSpool_ResurrectNeverLosesTheBody(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	env := testEnv(id)
	s.Put(env, []byte("body"))
	s.Bury(env, "rejected", time.Now())

	sw := &switchFS{}
	s.fs = sw
	sw.full.Store(true)
	if _, err := s.Resurrect(id, time.Now()); err == nil {
		t.Fatal("Resurrect succeeded on a full disk")
	}
	sw.full.Store(false)
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{id + ".eml", id + ".json"}) {
		t.Fatalf("dead/ after a failed retry = %v", got)
	}

	// Crash after the body moved back but before the dead envelope went:
	// Load finishes it as dead.
	js, _ := encodeEnvelope(env)
	os.WriteFile(s.path(id, ".json"), js, 0o600)
	os.Rename(filepath.Join(s.dead, id+".eml"), s.path(id, ".eml"))
	if _, _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{id + ".eml", id + ".json"}) {
		t.Fatalf("dead/ after Load = %v", got)
	}

	// Crash with only the body moved (no live envelope): back to dead/.
	os.Rename(filepath.Join(s.dead, id+".eml"), s.path(id, ".eml"))
	if _, _, err := s.Load(); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{id + ".eml", id + ".json"}) {
		t.Fatalf("dead/ after Load = %v", got)
	}
	if _, err := s.Resurrect(id, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{id + ".eml", id + ".json", "dead"}) {
		t.Errorf("spool after retry = %v", got)
	}
}

// An operator drops a message while a worker is dead-lettering it: no dead
// envelope may be left without its body.
func TestSpool_DropDuringBury(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	env := testEnv(id)
	s.Put(env, []byte("body"))
	s.Drop(id) // lands before Bury writes the dead envelope
	if err := s.Bury(env, "rejected", time.Now()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Bury of a dropped message = %v, want not exist", err)
	}
	if got := dirNames(t, s.dead); len(got) != 0 {
		t.Errorf("dead/ = %v, want empty", got)
	}
}
