package spool

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestCommitIsDurableAndPrivate(t *testing.T) {
	s := newTestSpool(t)
	id := NewID(time.Now())
	env := testEnv(id)
	body := testBody(id, 5000)
	put(t, s, env, body)
	if env.Size != len(body) || env.BodyCRC != crcHex(body) || env.Version != FormatVersion {
		t.Errorf("Commit set size %d crc %s v%d, want %d %s v2", env.Size, env.BodyCRC, env.Version, len(body), crcHex(body))
	}
	if got, want := dirNames(t, s.dir), []string{id + ".msg", "dead"}; !slices.Equal(got, want) {
		t.Fatalf("spool = %v, want %v (one file per message)", got, want)
	}
	if fi, _ := os.Stat(s.live(id)); fi.Mode().Perm() != 0o600 {
		t.Errorf("message file mode %v, want 0600", fi.Mode().Perm())
	}
	for _, d := range []string{s.dir, s.dead} {
		if fi, _ := os.Stat(d); fi.Mode().Perm() != 0o700 {
			t.Errorf("%s mode %v, want 0700", d, fi.Mode().Perm())
		}
	}
	if s.gs.Syncs() != 1 {
		t.Errorf("%d syncs for one commit, want 1", s.gs.Syncs())
	}
	envs, broken, err := s.Load()
	if err != nil || broken != 0 || len(envs) != 1 || stateJSON(envs[0]) != stateJSON(env) {
		t.Fatalf("Load = %v, %d, %v", envs, broken, err)
	}
	if got := readBody(t, s, id); !bytes.Equal(got, body) {
		t.Errorf("body read back differs (%d bytes, want %d)", len(got), len(body))
	}
}

func TestIDsSortByTime(t *testing.T) {
	var ids []string
	for i := range 50 {
		ids = append(ids, NewID(at(0).Add(time.Duration(i)*997*time.Microsecond)))
	}
	if !slices.IsSorted(ids) {
		t.Errorf("ids not time-sorted: %v", ids)
	}
	for _, id := range ids {
		if !validID(id) {
			t.Errorf("bad id %q", id)
		}
	}
	for _, bad := range []string{"", "../x", ".tmp-x", ".lock", "A", strings.Repeat("a", 65)} {
		if validID(bad) {
			t.Errorf("validID(%q) = true", bad)
		}
	}
}

// 64 sessions answering DATA at once share syncfs calls; each Commit still
// returns only after a sync that began after its own writes.
func TestConcurrentCommitsShareSyncs(t *testing.T) {
	s := newTestSpool(t)
	var wg sync.WaitGroup
	ids := make([]string, 64)
	for i := range ids {
		ids[i] = NewID(time.Now())
		wg.Go(func() {
			w, err := s.Create(ids[i])
			if err != nil {
				t.Error(err)
				return
			}
			w.Write(testBody(ids[i], 3000))
			if err := w.Commit(testEnv(ids[i])); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	envs, _, err := s.Load()
	if err != nil || len(envs) != len(ids) {
		t.Fatalf("Load = %d envs, %v", len(envs), err)
	}
	// Load's own sync is one more.
	if n := s.gs.Syncs(); n-1 >= uint64(len(ids)) {
		t.Errorf("%d syncs for %d concurrent commits: no group commit", n-1, len(ids))
	}
	t.Logf("%d syncfs for %d commits", s.gs.Syncs()-1, len(ids))
}

// The spool's syncs reach the watcher with the bytes each commit wrote,
// and its warning reaches the log, once per period.
func TestSlowSyncIsLogged(t *testing.T) {
	for _, tc := range []struct {
		name string
		fs   FS // nil: the group syncer; else the syncer of a replaced FS
	}{{"group sync", nil}, {"replaced file system", OS{}}} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			s, err := Open(filepath.Join(t.TempDir(), "spool"), Options{FS: tc.fs, Log: slog.New(slog.NewTextHandler(&logs, nil))})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			warnings := func() int { return strings.Count(logs.String(), "spool syncs slow") }
			commit := func() {
				id := NewID(time.Now())
				put(t, s, testEnv(id), testBody(id, 2000))
			}

			s.watch.slow = time.Hour
			commit()
			if n := warnings(); n != 0 {
				t.Fatalf("%d warnings for a sync under an hour:\n%s", n, logs.String())
			}
			s.watch.slow = -time.Hour // every sync is slow from here on
			commit()
			commit()
			if n := warnings(); n != 1 {
				t.Fatalf("%d warnings for two slow syncs, want 1 per %v:\n%s", n, slowSyncEvery, logs.String())
			}
			for _, want := range []string{"dir=" + s.dir, "took=", "bytes=2000 "} {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("warning lacks %q:\n%s", want, logs.String())
				}
			}
		})
	}
}

func TestSyncWatch(t *testing.T) {
	const small = 2 << 10
	// obs is one sync: when, how long it took, the spool's bytes in it.
	type obs struct {
		after time.Duration
		took  time.Duration
		wrote int64
	}
	// even spreads n syncs over span; slowAt says which ones are slow.
	even := func(n int, span time.Duration, fast, slow time.Duration, wrote int64, slowAt func(i int) bool) []obs {
		var ss []obs
		for i := range n {
			took := fast
			if slowAt(i) {
				took = slow
			}
			ss = append(ss, obs{span * time.Duration(i) / time.Duration(max(n-1, 1)), took, wrote})
		}
		return ss
	}
	none := func(int) bool { return false }
	all := func(int) bool { return true }
	every := func(k int) func(int) bool { return func(i int) bool { return i%k == 0 } }
	span := syncWindow + time.Second
	for _, tc := range []struct {
		name  string
		syncs []obs
		warns int
	}{
		{"own disk", even(200, span, 300*time.Microsecond, 0, small, none), 0},
		{"own disk, one long stall in a quiet window", even(30, span, 300*time.Microsecond, 150*time.Millisecond, small, func(i int) bool { return i == 7 }), 0},
		{"a neighbour: every other sync slow", even(40, span, time.Millisecond, 12*time.Millisecond, small, every(2)), 1},
		{"a neighbour: every other sync 6 ms", even(40, span, time.Millisecond, 6*time.Millisecond, small, every(2)), 1},
		{"a quarter of the syncs slow", even(40, span, time.Millisecond, slowSyncEach+time.Millisecond, small, every(4)), 1},
		{"a fifth of the syncs slow", even(40, span, time.Millisecond, 20*time.Millisecond, small, every(5)), 0},
		{"slow syncs just under the excess that counts", even(40, span, time.Millisecond, slowSyncEach-100*time.Microsecond, small, all), 0},
		{"1 MB messages at 125 MB/s", even(40, span, 8*time.Millisecond, 0, 1<<20, none), 0},
		{"our own 8 MB batches", even(40, span, 75*time.Millisecond, 0, 8<<20, none), 0},
		{"low traffic beside a neighbour, one sync a second", even(60, time.Minute, 25*time.Millisecond, 0, small, none), 1},
		{"low traffic on its own disk, two stalls in a row", even(40, 80*time.Second, 300*time.Microsecond, 150*time.Millisecond, small, func(i int) bool { return i == 7 || i == 8 }), 0},
		{"too few syncs to judge", even(syncWindowFew-1, syncWindowMax+time.Minute, 50*time.Millisecond, 0, small, none), 0},
		{"one sync over a second", []obs{{0, 1500 * time.Millisecond, small}}, 1},
		{"one second-long sync of 200 MB of our own", []obs{{0, 1500 * time.Millisecond, 200 << 20}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newSyncWatch()
			t0 := at(0)
			run := func(from time.Time) (warns [][]any) {
				for _, s := range tc.syncs {
					if a := w.observe(from.Add(s.after), s.took, s.wrote); a != nil {
						warns = append(warns, a)
					}
				}
				return warns
			}
			got := run(t0)
			if len(got) != tc.warns {
				t.Fatalf("%d warnings, want %d: %v", len(got), tc.warns, got)
			}
			if tc.warns == 0 {
				return
			}
			t.Logf("warning: %v", got[0])
			last := tc.syncs[len(tc.syncs)-1].after
			if again := run(t0.Add(slowSyncEvery - time.Minute)); len(again) != 0 {
				t.Errorf("warned again within %v: %v", slowSyncEvery, again)
			}
			if later := run(t0.Add(2*slowSyncEvery + last)); len(later) != 1 {
				t.Errorf("%d warnings after %v, want 1", len(later), slowSyncEvery)
			}
		})
	}
}

// fullFS is the real file system with a disk that fills up after left
// bytes, a free-space figure the test sets, and syncs that can fail.
type fullFS struct {
	OS
	mu      sync.Mutex
	left    int64 // <0: no limit
	free    int64
	syncErr error
}

type fullFile struct {
	File
	fs *fullFS
}

func (f *fullFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	of, err := f.OS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &fullFile{File: of, fs: f}, nil
}

func (f *fullFS) SyncFS(dir string) error {
	f.mu.Lock()
	err := f.syncErr
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.OS.SyncFS(dir)
}

func (f *fullFS) Statfs(string) (Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return Usage{FreeBytes: f.free, FreeInodes: -1}, nil
}

// take grants up to n bytes of the disk.
func (f *fullFS) take(n int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.left < 0 {
		return n
	}
	n = int(min(int64(n), f.left))
	f.left -= int64(n)
	return n
}

var errNoSpace = &fs.PathError{Op: "write", Path: "spool", Err: syscall.ENOSPC}

func (f *fullFile) Write(b []byte) (int, error) {
	n := f.fs.take(len(b))
	m, err := f.File.Write(b[:n])
	if err == nil && n < len(b) {
		err = errNoSpace
	}
	return m, err
}

func (f *fullFile) WriteAt(b []byte, off int64) (int, error) {
	n := f.fs.take(len(b))
	m, err := f.File.WriteAt(b[:n], off)
	if err == nil && n < len(b) {
		err = errNoSpace
	}
	return m, err
}

func openFS(t *testing.T, fsys FS) *Spool {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "spool"), Options{FS: fsys})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The disk fills up while a 200 KB message streams in, at every stage of
// the intake: the client gets an error (451) and nothing is kept.
func TestDiskFullMidStreamKeepsNothing(t *testing.T) {
	body := testBody("x", 200_000)
	// The size of a whole file, to fail on its last bytes (the header).
	probe := newTestSpool(t)
	put(t, probe, testEnv("x"), body)
	fi, _ := os.Stat(probe.live("x"))
	whole := fi.Size()
	for _, left := range []int64{0, 1000, 70_000, 150_000, 200_063, whole - 100, whole - headerSize, whole - 1} {
		t.Run(fmt.Sprint(left), func(t *testing.T) {
			fsys := &fullFS{left: left, free: 10 << 20}
			s := openFS(t, fsys)
			w, err := s.Create("x")
			if err != nil {
				t.Fatal(err)
			}
			if _, err = w.Write(body); err != nil {
				w.Abort()
			} else {
				err = w.Commit(testEnv("x"))
			}
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("intake = %v, want ENOSPC", err)
			}
			if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
				t.Errorf("spool after a failed intake = %v, want nothing kept", got)
			}
			// Unready until space is freed, even though statfs shows plenty.
			if err := s.Writable(1 << 20); !errors.Is(err, ErrFull) {
				t.Errorf("Writable after ENOSPC = %v, want ErrFull", err)
			}
			fsys.mu.Lock()
			fsys.free, fsys.left = 20<<20, -1
			fsys.mu.Unlock()
			if err := s.Writable(1 << 20); err != nil {
				t.Errorf("Writable after space was freed = %v", err)
			}
		})
	}
}

func TestWritable(t *testing.T) {
	fsys := &fullFS{left: -1, free: 100 << 20}
	s := openFS(t, fsys)
	if err := s.Writable(50 << 20); err != nil {
		t.Fatalf("Writable = %v", err)
	}
	if err := s.Writable(200 << 20); !errors.Is(err, ErrFull) {
		t.Errorf("Writable below minFree = %v, want ErrFull", err)
	}
	// The disk lost writes (EIO on writeback): nothing later may be
	// called durable, so the spool stays unready and commits fail.
	fsys.syncErr = syscall.EIO
	w, _ := s.Create("a")
	w.Write([]byte("x"))
	if err := w.Commit(testEnv("a")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Commit with a failing sync = %v", err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
		t.Errorf("spool after a failed sync = %v", got)
	}
	fsys.syncErr = nil
	if err := s.Writable(0); !errors.Is(err, syscall.EIO) {
		t.Errorf("Writable after a failed sync = %v, want the sticky EIO", err)
	}
	w, _ = s.Create("b")
	if err := w.Commit(testEnv("b")); err == nil {
		t.Error("Commit after a failed sync succeeded")
	}
}

// `relaycar queue ls` in another process while the relay appends,
// compacts and accepts: every read sees a complete state, never an
// uncommitted message.
func TestListWhileWriting(t *testing.T) {
	s := newTestSpool(t)
	s.compactAt = 4 << 10 // compact often
	env := testEnv("a")
	put(t, s, env, testBody("a", 100_000))
	reader, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	inflight, _ := s.Create("b")
	inflight.Write(testBody("b", 100_000))
	defer inflight.Abort()

	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; i <= 300; i++ {
			env.Attempts = i
			if err := s.Update(env); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	last := 0
	for reading := true; reading; {
		select {
		case <-done:
			reading = false
		default:
		}
		envs, err := reader.List()
		if err != nil || len(envs) != 1 || envs[0].ID != "a" {
			t.Fatalf("List while writing = %v, %v", envs, err)
		}
		if envs[0].Attempts < last {
			t.Fatalf("List went back from %d to %d attempts", last, envs[0].Attempts)
		}
		last = envs[0].Attempts
		if _, err := reader.Get("b"); err == nil {
			t.Fatal("Get found an uncommitted message")
		}
	}
	if e, _ := reader.Get("a"); e.Attempts != 300 {
		t.Errorf("final state has %d attempts, want 300", e.Attempts)
	}
	if b := readBody(t, s, "a"); !bytes.Equal(b, testBody("a", 100_000)) {
		t.Error("body changed by compactions")
	}
}

func TestDropWhileBuried(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a")
	put(t, s, env, []byte("body"))
	if err := s.Bury(env, "550 5.1.1 no such user", at(10)); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{"a.msg"}) || s.CountDead() != 1 {
		t.Fatalf("dead/ after Bury = %v, CountDead %d", got, s.CountDead())
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("List shows a dead letter: %v", l)
	}
	if err := s.Drop("a"); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Dead(); len(d) != 0 || s.CountDead() != 0 || len(dirNames(t, s.dead)) != 0 {
		t.Errorf("after Drop: Dead = %v, CountDead %d", d, s.CountDead())
	}
	if err := s.Drop("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("second Drop = %v, want not exist", err)
	}
	if err := s.Drop("../../etc/passwd"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Drop(path) = %v, want refused", err)
	}
}

// An operator drops a message while a worker is about to dead-letter or
// update it: nothing comes back.
func TestDropBeforeBuryAndUpdate(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a")
	put(t, s, env, []byte("body"))
	if err := s.Drop("a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Bury(env, "rejected", at(1)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Bury of a dropped message = %v, want not exist", err)
	}
	if err := s.Update(env); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Update of a dropped message = %v, want not exist", err)
	}
	if _, err := s.OpenBody("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("OpenBody of a dropped message = %v", err)
	}
	if got := append(dirNames(t, s.dir), dirNames(t, s.dead)...); !slices.Equal(got, []string{"dead"}) {
		t.Errorf("spool = %v, want empty", got)
	}
}

func TestLock(t *testing.T) {
	s := newTestSpool(t)
	if err := s.Lock(); err != nil {
		t.Fatal(err)
	}
	other, _ := Open(s.dir, Options{})
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
	if err := other.Lock(); err != nil {
		t.Errorf("Lock after Unlock = %v", err)
	}
	other.Unlock()
}

// A crash tore the last record (or left zeros after it, or the disk
// flipped a bit in it): the state before it is read, and the next Update
// lands where the torn record began.
func TestTornTailFallsBack(t *testing.T) {
	for _, tc := range []struct {
		name string
		tear func(b []byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-5] }},
		{"length only", func(b []byte) []byte {
			i := bytes.LastIndex(b, []byte(`{"v":2`)) - recHeader
			return b[:i+4]
		}},
		{"bit flip", func(b []byte) []byte {
			i := bytes.LastIndex(b, []byte(`"attempts":2`))
			b[i+len(`"attempts":`)] = '7'
			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestSpool(t)
			env := testEnv("a")
			put(t, s, env, []byte("body"))
			for i := 1; i <= 2; i++ {
				env.Attempts = i
				if err := s.Update(env); err != nil {
					t.Fatal(err)
				}
			}
			b, _ := os.ReadFile(s.live("a"))
			os.WriteFile(s.live("a"), tc.tear(b), 0o600)
			if e, err := s.Get("a"); err != nil || e.Attempts != 1 {
				t.Fatalf("Get after a torn tail = %+v, %v; want the state with 1 attempt", e, err)
			}
			env.Attempts = 3
			if err := s.Update(env); err != nil {
				t.Fatal(err)
			}
			envs, broken, err := s.Load()
			if err != nil || broken != 0 || len(envs) != 1 || envs[0].Attempts != 3 {
				t.Fatalf("Load = %+v, %d, %v; want the state with 3 attempts", envs, broken, err)
			}
		})
	}
	t.Run("zeros after", func(t *testing.T) {
		s := newTestSpool(t)
		env := testEnv("a")
		put(t, s, env, []byte("body"))
		env.Attempts = 1
		s.Update(env)
		f, _ := os.OpenFile(s.live("a"), os.O_WRONLY|os.O_APPEND, 0)
		f.Write(make([]byte, 4096)) // size grew, blocks never written
		f.Close()
		if e, err := s.Get("a"); err != nil || e.Attempts != 1 {
			t.Fatalf("Get = %+v, %v", e, err)
		}
	})
}

// Damage Load must set aside, and leftovers it must clean up.
func TestLoadQuarantinesDamage(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	for _, id := range []string{"good", "hdr", "crc", "norec", "done", "deadbad", "halfburied"} {
		put(t, s, testEnv(id), testBody(id, 3000))
	}
	w, _ := s.Create("uncommitted")
	w.Write(testBody("uncommitted", 100_000)) // crash while in DATA
	flip := func(path string, off int64) {
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		b := make([]byte, 1)
		f.ReadAt(b, off)
		b[0] ^= 0x20
		f.WriteAt(b, off)
		f.Close()
	}
	flip(s.live("hdr"), 20)
	flip(s.live("crc"), 100)
	os.Truncate(s.live("norec"), headerSize+3000)
	s.Remove("done")
	deadbad := testEnv("deadbad")
	s.Bury(deadbad, "rejected", at(1))
	flip(s.deadPath("deadbad"), 200)
	half := testEnv("halfburied")
	half.DeadReason = "rejected"
	s.appendEnvelope(s.live("halfburied"), half, false) // crash before the rename
	os.WriteFile(filepath.Join(s.dir, ".tmp-1234"), []byte("x"), 0o600)
	os.WriteFile(s.live("hdr")+".broken", []byte("an earlier one"), 0o600)

	envs, broken, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(envs) != 1 || envs[0].ID != "good" || broken != 5 {
		t.Fatalf("Load = %v, %d broken; want [good], 5", envs, broken)
	}
	want := []string{"crc.msg.broken", "dead", "good.msg", "hdr.msg.broken", "hdr.msg.broken.2", "norec.msg.broken", "uncommitted.msg.broken"}
	if got := dirNames(t, s.dir); !slices.Equal(got, want) {
		t.Errorf("spool after Load = %v, want %v", got, want)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{"deadbad.msg.broken", "halfburied.msg"}) {
		t.Errorf("dead/ after Load = %v", got)
	}
	if d, _ := s.Dead(); len(d) != 1 || d[0].DeadReason != "rejected" || s.CountDead() != 1 {
		t.Errorf("Dead = %v, CountDead %d", d, s.CountDead())
	}
	if _, b2, _ := s.Load(); b2 != 0 {
		t.Errorf("second Load quarantined %d more", b2)
	}
}

// A spool file written by a newer release is left alone: a rollback must
// not damage what the newer relay will deliver.
func TestNewerFormatLeftAlone(t *testing.T) {
	s := newTestSpool(t)
	put(t, s, testEnv("a"), []byte("body"))
	f, _ := os.OpenFile(s.live("a"), os.O_RDWR, 0)
	f.WriteAt([]byte{FormatVersion + 1}, 7)
	f.Close()
	envs, broken, err := s.Load()
	if err != nil || len(envs) != 0 || broken != 0 {
		t.Fatalf("Load = %v, %d, %v", envs, broken, err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"a.msg", "dead"}) {
		t.Errorf("spool = %v", got)
	}
}

func TestRemoveLeavesTheUnlinkToTheReaper(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	put(t, s, testEnv("a"), []byte("body"))
	put(t, s, testEnv("b"), []byte("body"))
	syncs := s.gs.Syncs()
	if err := s.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if s.gs.Syncs() != syncs {
		t.Error("Remove synced")
	}
	if _, err := os.Stat(s.live("a")); err != nil {
		t.Fatalf("Remove unlinked on the delivery path: %v", err)
	}
	if _, err := s.Get("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Get of a removed message = %v", err)
	}
	if l, _ := s.List(); len(l) != 1 || l[0].ID != "b" {
		t.Errorf("List = %v", l)
	}
	s.Close()
	// A small file goes to the pool rather than away.
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{".free-a", "b.msg", "dead"}) {
		t.Errorf("after Close = %v", got)
	}
	// With the reaper running, and Load for a kill -9 before it ran.
	s2 := newTestSpool(t)
	put(t, s2, testEnv("c"), []byte("body"))
	put(t, s2, testEnv("d"), []byte("body"))
	s2.Remove("c")
	s2.Close()
	if _, err := os.Stat(s2.live("c")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("reaper left c: %v", err)
	}
	s3, _ := Open(s2.dir, Options{})
	s3.manualReap = true
	s3.Remove("d")
	if envs, _, _ := s3.Load(); len(envs) != 0 || !slices.Equal(dirNames(t, s3.dir), []string{".free-c", "dead"}) {
		t.Errorf("Load left a done file: %v %v", envs, dirNames(t, s3.dir))
	}
}

func TestResurrect(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a", "ok@example.net", "bad@example.net")
	put(t, s, env, testBody("a", 1000))
	env.Deliveries = []Delivery{{Route: "default", Upstream: "sink", Rcpts: []string{"ok@example.net"}, At: at(1)}}
	env.Failures = []Failure{{Route: "default", Upstream: "sink", Class: "rejected", Rcpts: []string{"bad@example.net"}, Reason: "550", At: at(1)}}
	env.Routes[0].Pending, env.Attempts, env.LastError = nil, 3, "550"
	env.UpstreamErrors = map[string]string{"sink": "550"}
	if err := s.Bury(env, "bad@example.net: 550", at(2)); err != nil {
		t.Fatal(err)
	}
	back, err := s.Resurrect("a", at(100))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(back.Routes[0].Pending, []string{"bad@example.net"}) || len(back.Deliveries) != 1 ||
		back.Failures != nil || back.DeadReason != "" || back.DeadAt != nil || back.Attempts != 0 ||
		!back.ReceivedAt.Equal(at(100)) || !back.NextAttempt.Equal(at(100)) || back.LastError != "" || back.UpstreamErrors != nil {
		t.Errorf("resurrected = %+v", back)
	}
	if got, _ := s.Get("a"); got == nil || stateJSON(got) != stateJSON(back) {
		t.Errorf("Get = %+v", got)
	}
	if d, _ := s.Dead(); len(d) != 0 {
		t.Errorf("Dead after Resurrect = %v", d)
	}
	if b := readBody(t, s, "a"); !bytes.Equal(b, testBody("a", 1000)) {
		t.Error("body changed")
	}
	if _, err := s.Resurrect("a", at(200)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Resurrect of a live message = %v", err)
	}
}

// A dead letter whose failure names a route state that a reload has since
// renamed (its route removed: delivery moved the state to the default)
// gets its failed recipients back as pending, each once; before, they
// matched no state, so the retry had nothing to send and removed the
// message as delivered.
func TestResurrect_FailureOfARenamedRoute(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a", "ok@example.net", "bad@example.net", "late@example.net")
	put(t, s, env, testBody("a", 1000))
	env.Routes = []RouteState{{Route: "default"}, {Route: "default"}}
	env.Deliveries = []Delivery{{Route: "default", Upstream: "sink", Rcpts: []string{"ok@example.net"}, At: at(1)}}
	env.Failures = []Failure{
		{Route: "partners", Upstream: "sink", Class: "rejected", Rcpts: []string{"bad@example.net"}, Reason: "550", At: at(1)},
		{Route: "default", Upstream: "sink", Class: "rejected", Rcpts: []string{"late@example.net"}, Reason: "550", At: at(1)},
	}
	if err := s.Bury(env, "bad@example.net: 550; late@example.net: 550", at(2)); err != nil {
		t.Fatal(err)
	}
	back, err := s.Resurrect("a", at(100))
	if err != nil {
		t.Fatal(err)
	}
	pending := map[string][]string{}
	n := 0
	for _, rs := range back.Routes {
		pending[rs.Route] = append(pending[rs.Route], rs.Pending...)
		n += len(rs.Pending)
	}
	if !back.Pending() || n != 2 || !slices.Equal(pending["partners"], []string{"bad@example.net"}) ||
		!slices.Equal(pending["default"], []string{"late@example.net"}) {
		t.Errorf("resurrected routes = %+v, want bad@ pending under partners and late@ once under default", back.Routes)
	}
	if got, _ := s.Get("a"); got == nil || stateJSON(got) != stateJSON(back) {
		t.Errorf("Get = %+v", got)
	}
}

// Two days of retries: the file's records stay bounded, the body intact,
// and a body opened before a compaction still reads.
func TestCompaction(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a")
	body := testBody("a", 300_000)
	put(t, s, env, body)
	open, err := s.OpenBody("a")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	for i := 1; i <= 1000; i++ {
		env.Attempts, env.LastError = i, fmt.Sprintf("451 4.3.0 attempt %d", i)
		if err := s.Update(env); err != nil {
			t.Fatal(err)
		}
	}
	fi, _ := os.Stat(s.live("a"))
	if fi.Size() > int64(len(body))+headerSize+compactAt {
		t.Errorf("file is %d bytes after 1000 updates: not compacted", fi.Size())
	}
	if e, _ := s.Get("a"); e.Attempts != 1000 {
		t.Errorf("state after compactions: %d attempts", e.Attempts)
	}
	if b := readBody(t, s, "a"); !bytes.Equal(b, body) {
		t.Error("body changed by compaction")
	}
	if open.Size() != int64(len(body)) {
		t.Errorf("open body size %d", open.Size())
	}
	got := make([]byte, 100)
	if _, err := open.ReadAt(got, 1000); err != nil || !bytes.Equal(got, body[1000:1100]) {
		t.Errorf("body opened before the compactions: %v", err)
	}
}

// statFS reports a fixed statfs; tests change u as they go.
type statFS struct {
	OS
	mu sync.Mutex
	u  Usage
}

func (f *statFS) Statfs(string) (Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.u, nil
}

// Ready for /readyz means room for a message of the largest size, not
// merely that a file can be created (which works on a full disk).
func TestWritableWantsRoomForTheLargestMessage(t *testing.T) {
	const need = 25<<20 + 64<<10
	for _, tc := range []struct {
		name string
		u    Usage
		full bool
	}{
		{"plenty", Usage{FreeBytes: 10 << 30, TotalBytes: 100 << 30, FreeInodes: -1}, false},
		{"exactly one message", Usage{FreeBytes: need, TotalBytes: 100 << 30, FreeInodes: -1}, false},
		{"one byte short", Usage{FreeBytes: need - 1, TotalBytes: 100 << 30, FreeInodes: -1}, true},
		{"1 MiB left", Usage{FreeBytes: 1 << 20, TotalBytes: 100 << 30, FreeInodes: -1}, true},
		// A volume smaller than ten maximum-size messages is asked for a
		// tenth of itself, or it would never be ready.
		{"small volume, room for small mail", Usage{FreeBytes: 500 << 10, TotalBytes: 600 << 10, FreeInodes: -1}, false},
		{"small volume, full", Usage{FreeBytes: 10 << 10, TotalBytes: 600 << 10, FreeInodes: -1}, true},
		{"out of inodes", Usage{FreeBytes: 10 << 30, TotalBytes: 100 << 30, FreeInodes: 0}, true},
		{"no fixed inode count", Usage{FreeBytes: 10 << 30, TotalBytes: 100 << 30, FreeInodes: -1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openFS(t, &statFS{u: tc.u})
			err := s.Writable(need)
			if tc.full != errors.Is(err, ErrFull) || (!tc.full && err != nil) {
				t.Errorf("Writable(%d) with %+v = %v, want full %v", need, tc.u, err, tc.full)
			}
		})
	}
}

// Records chain their CRCs: after a torn record (R2 lost, R3 kept by the
// page cache's write-back order), the next append fills R2's slot; the
// stale R3 behind it must not become the state again.
func TestStaleRecordBehindTornOneStaysDead(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a")
	put(t, s, env, testBody("a", 1000))
	endOf := func() int64 {
		f, err := os.Open(s.live("a"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		st, err := readState(f, "a")
		if err != nil {
			t.Fatal(err)
		}
		return st.end
	}
	env.Attempts = 2
	if err := s.Update(env); err != nil {
		t.Fatal(err)
	}
	r2Start := endOf()
	env.Attempts = 3 // R2
	if err := s.Update(env); err != nil {
		t.Fatal(err)
	}
	r3Start := endOf()
	env.Attempts = 5 // R3, same length as R2
	if err := s.Update(env); err != nil {
		t.Fatal(err)
	}
	// Lose R2 only.
	f, err := os.OpenFile(s.live("a"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, r3Start-r2Start), r2Start); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got, err := s.Get("a"); err != nil || got.Attempts != 2 {
		t.Fatalf("after losing R2: attempts %v (%v), want 2", got, err)
	}
	env.Attempts = 4 // R4 lands exactly in R2's slot
	if err := s.Update(env); err != nil {
		t.Fatal(err)
	}
	if endOf() != r3Start {
		t.Fatalf("R4 did not fill R2's slot exactly; the test needs equal record lengths")
	}
	if got, err := s.Get("a"); err != nil || got.Attempts != 4 {
		t.Errorf("state after R4 = attempts %d (%v), want 4: the stale R3 came back", got.Attempts, err)
	}
}

// readTail (the done record's append) must end where readState ends,
// though it recognises envelope records by their id key, undecoded: also
// after a stale record of another message chained to an identical body,
// and when another message's address spells the key inside a value.
func TestReadTailEndsWhereReadStateDoes(t *testing.T) {
	body := testBody("a", 300)
	h := header{bodyOff: headerSize, bodyLen: int64(len(body)), bodyCRC: crc32c(body)}
	// records chains envs from the body; nil is a done record.
	records := func(envs []*Envelope) []byte {
		out, last := []byte(nil), h.bodyCRC
		for _, e := range envs {
			rec := record(last, recDone, nil)
			if e != nil {
				var err error
				if rec, err = envelopeRecord(last, e); err != nil {
					t.Fatal(err)
				}
			}
			last = binary.LittleEndian.Uint32(rec[4:])
			out = append(out, rec...)
		}
		return out
	}
	a1, a2 := testEnv("a"), testEnv("a")
	a2.Attempts = 2
	b := testEnv("b")
	spoofer := testEnv("b")
	spoofer.From = `x"id":"a"@example.com`
	for _, tc := range []struct {
		name  string
		envs  []*Envelope
		valid int // how many of envs are a's state
		done  bool
	}{
		{"two states", []*Envelope{a1, a2}, 2, false},
		{"delivered", []*Envelope{a1, a2, nil}, 3, true},
		{"stale record of another message behind", []*Envelope{a1, b, nil}, 1, false},
		{"another message spells the key in a value", []*Envelope{spoofer, nil}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "a.msg")
			data := append(append(h.encode(), body...), records(tc.envs)...)
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			full, err := readState(f, "a")
			if err != nil {
				t.Fatal(err)
			}
			tail, err := readTail(f, "a")
			if err != nil {
				t.Fatal(err)
			}
			wantEnd := h.bodyEnd() + int64(len(records(tc.envs[:tc.valid])))
			for _, st := range []struct {
				name string
				st   *state
			}{{"readState", full}, {"readTail", tail}} {
				if st.st.end != wantEnd || st.st.done != tc.done || st.st.size != int64(len(data)) {
					t.Errorf("%s: end %d done %v size %d, want end %d done %v size %d",
						st.name, st.st.end, st.st.done, st.st.size, wantEnd, tc.done, len(data))
				}
			}
			if tail.last != full.last {
				t.Errorf("readTail chains to %08x, readState to %08x", tail.last, full.last)
			}
		})
	}
}
