package spool

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// delivered puts a message, removes it as delivered and runs the reaper,
// then syncs twice so that its file is ready in the pool.
func delivered(t *testing.T, s *Spool, id string, size int) os.FileInfo {
	t.Helper()
	put(t, s, testEnv(id), testBody(id, size))
	fi, err := os.Stat(s.live(id))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(id); err != nil {
		t.Fatal(err)
	}
	s.reapNow()
	for range 2 {
		if err := s.sync.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	return fi
}

func TestPool_ReusesDeliveredFileWithoutItsOldBytes(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	old := delivered(t, s, "a", 40<<10)
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{".free-a", "dead"}) {
		t.Fatalf("after delivery = %v", got)
	}

	body := testBody("c", 700)
	put(t, s, testEnv("c"), body)
	fi, err := os.Stat(s.live("c"))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(old, fi) {
		t.Fatal("c is in a new file, not a's")
	}
	if fi.Size() <= int64(len(body))+headerSize {
		t.Fatalf("c's file is %d bytes: a's old bytes should still follow c's", fi.Size())
	}
	// Written alone, c stays under the free name: no rename for the
	// file's next sync to pay for.
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{".free-a", "dead"}) {
		t.Errorf("after reuse = %v", got)
	}
	if got := readBody(t, s, "c"); !bytes.Equal(got, body) {
		t.Errorf("c's body is %d bytes, want its own %d", len(got), len(body))
	}
	env, err := s.Get("c")
	if err != nil || env.ID != "c" || env.Size != len(body) {
		t.Fatalf("Get(c) = %+v, %v", env, err)
	}
	// Its states append over a's old records, and a restart reads c alone.
	env.Attempts = 3
	if err := s.Update(env); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Another process (relaycar queue ls) lists it from the file alone.
	if envs, err := s2.List(); err != nil || len(envs) != 1 || envs[0].ID != "c" || envs[0].Attempts != 3 {
		t.Fatalf("List beside the spool = %v, %v", envs, err)
	}
	envs, broken, err := s2.Load()
	if err != nil || broken != 0 || len(envs) != 1 || envs[0].ID != "c" || envs[0].Attempts != 3 {
		t.Fatalf("Load = %v, %d broken, %v", envs, broken, err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"c.msg", "dead"}) {
		t.Errorf("after Load = %v, want c under its own name", got)
	}
}

// placedIn is the free name of the pool file message id was left in, or "".
func placedIn(s *Spool, id string) string {
	free, _ := s.placed.get(id)
	return free
}

func TestPool_PlacedMessageIsDeliveredDroppedBuriedAndNamedAtClose(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	for _, id := range []string{"a", "b", "c", "d"} {
		put(t, s, testEnv(id), testBody(id, 100))
	}
	for _, id := range []string{"a", "b", "c", "d"} {
		s.Remove(id)
	}
	s.reapNow()
	for range 2 {
		s.sync.Sync()
	}
	for _, id := range []string{"w", "x", "y", "z"} {
		put(t, s, testEnv(id), testBody(id, 200))
		if placedIn(s, id) == "" {
			t.Fatalf("%s, written alone over a free file, was renamed", id)
		}
	}
	envs, err := s.List()
	if err != nil || len(envs) != 4 {
		t.Fatalf("List = %v, %v; want w, x, y, z", envs, err)
	}
	// Delivered: the file goes back to the pool under the same name.
	wFile := placedIn(s, "w")
	if err := s.Remove("w"); err != nil {
		t.Fatal(err)
	}
	s.reapNow()
	if _, err := os.Stat(s.freePath(wFile)); err != nil || placedIn(s, "w") != "" {
		t.Fatalf("w's pool file after delivery: %v, placed %q", err, placedIn(s, "w"))
	}
	if _, err := s.Get("w"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Get of delivered w = %v", err)
	}
	// Dropped: the file is gone.
	xFile := placedIn(s, "x")
	if err := s.Drop("x"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.freePath(xFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("dropped x's file is still there: %v", err)
	}
	// Buried: dead/<id>.msg, with its reason.
	env, err := s.Get("y")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Bury(env, "550 no such user", time.Now()); err != nil {
		t.Fatal(err)
	}
	if dead, err := s.Dead(); err != nil || len(dead) != 1 || dead[0].ID != "y" || placedIn(s, "y") != "" {
		t.Fatalf("Dead = %v, %v", dead, err)
	}
	// z is still queued at Close, which gives it its own name.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.dir, "z.msg")); err != nil {
		t.Fatalf("z after Close: %v", err)
	}
	if got := readBody(t, s, "z"); !bytes.Equal(got, testBody("z", 200)) {
		t.Error("z's body changed")
	}
}

func TestPool_KeepsOnlySmallFilesAndAtMostPoolMax(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	delivered(t, s, "big", poolMaxBytes)
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
		t.Errorf("a file over %d bytes was kept: %v", poolMaxBytes, got)
	}
	for range poolMax {
		s.pool.soon = append(s.pool.soon, freeFile{gen: 1 << 60}) // never ready
	}
	delivered(t, s, "small", 100)
	if _, err := os.Stat(s.freePath("small")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a full pool took another file: %v", err)
	}
}

func TestPool_FileNotReadyUntilSyncedAfterItsRename(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	put(t, s, testEnv("a"), testBody("a", 100))
	s.Remove("a")
	s.reapNow()
	// No sync since the rename: a's done record and new name may not be
	// durable, so its bytes must not be written over yet.
	// One sync is not enough either: it may have been running at the
	// rename. b and c each commit with one.
	put(t, s, testEnv("b"), testBody("b", 100))
	put(t, s, testEnv("c"), testBody("c", 100))
	if placedIn(s, "c") == "a" {
		t.Fatal("c took a's file after one sync")
	}
	put(t, s, testEnv("d"), testBody("d", 100))
	if placedIn(s, "d") != "a" {
		t.Errorf("d did not take a's file after two syncs")
	}
}

func TestPool_ReusedFileNeverCommittedIsNotDelivered(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	delivered(t, s, "a", 2000)
	w, err := s.Create("d")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(testBody("d", 100)) // buffered: on disk .free-a still holds a's bytes
	// The process dies here; the next one loads the spool.
	s2, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, broken, err := s2.Load()
	if err != nil || len(envs) != 0 || broken != 0 {
		t.Fatalf("Load = %v, %d broken, %v; want nothing loaded or quarantined", envs, broken, err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{".free-a", "dead"}) {
		t.Errorf("spool = %v, want a's file back in the pool", got)
	}
}

// reusedThenRenameLost commits id over a's free file, then puts the file
// back under the free name, as a crash does that loses the unsynced
// rename to <id>.msg.
func reusedThenRenameLost(t *testing.T, s *Spool, id string, body []byte) {
	t.Helper()
	delivered(t, s, "a", 2000)
	put(t, s, testEnv(id), body)
	if err := os.Rename(s.live(id), s.freePath("a")); err != nil {
		t.Fatal(err)
	}
}

func TestPool_CommittedInPlaceLoadsWhenItsRenameWasLost(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	body := testBody("c", 700)
	reusedThenRenameLost(t, s, "c", body)
	s2, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, broken, err := s2.Load()
	if err != nil || broken != 0 || len(envs) != 1 || envs[0].ID != "c" {
		t.Fatalf("Load = %v, %d broken, %v; want c", envs, broken, err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"c.msg", "dead"}) {
		t.Errorf("spool = %v", got)
	}
	if got := readBody(t, s2, "c"); !bytes.Equal(got, body) {
		t.Errorf("c's body is %d bytes, want its own %d", len(got), len(body))
	}
}

func TestPool_CommittedInPlaceWithDamagedBodyIsQuarantined(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	reusedThenRenameLost(t, s, "c", testBody("c", 700))
	f, err := os.OpenFile(s.freePath("a"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("XXXX"), headerSize+100)
	f.Close()
	s2, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, broken, err := s2.Load()
	if err != nil || broken != 1 || len(envs) != 0 {
		t.Fatalf("Load = %v, %d broken, %v; want c quarantined", envs, broken, err)
	}
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"c.msg.broken", "dead"}) {
		t.Errorf("spool = %v", got)
	}
}

// commitQueuedX writes a second x, alone, and wants its commit to fail
// with x's first body untouched.
func commitQueuedX(t *testing.T, s *Spool) {
	t.Helper()
	w, err := s.Create("x")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(testBody("x", 300))
	if err := w.Commit(testEnv("x")); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Commit of a queued id = %v, want fs.ErrExist", err)
	}
	if got := readBody(t, s, "x"); !bytes.Equal(got, testBody("x", 100)) {
		t.Error("the queued message was overwritten")
	}
}

func TestPool_QueuedIDIsRefusedLikeOExcl(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	put(t, s, testEnv("x"), testBody("x", 100))
	delivered(t, s, "a", 100)
	commitQueuedX(t, s)
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead", "x.msg"}) {
		t.Errorf("spool = %v, want only the queued x", got)
	}

	// With another message being written, the commit fails the same way
	// before its shared syncfs.
	for _, id := range []string{"b", "c"} {
		put(t, s, testEnv(id), testBody(id, 100))
	}
	for _, id := range []string{"b", "c"} {
		s.Remove(id)
	}
	s.reapNow()
	for range 2 {
		s.sync.Sync()
	}
	other, err := s.Create("y")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Abort()
	syncs := s.sync.Syncs()
	commitQueuedX(t, s)
	if s.sync.Syncs() != syncs {
		t.Error("the refused commit waited for a syncfs")
	}
}

func TestPool_BesideAnotherIntakeTheFileStaysInPlaceAndSharesTheSyncfs(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	// Two free files: a's and b's.
	put(t, s, testEnv("a"), testBody("a", 2000))
	put(t, s, testEnv("b"), testBody("b", 2000))
	a, err := os.Stat(s.live("a"))
	if err != nil {
		t.Fatal(err)
	}
	s.Remove("a")
	s.Remove("b")
	s.reapNow()
	for range 2 {
		if err := s.sync.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	other, err := s.Create("y") // alone: written over .free-b in place
	if err != nil {
		t.Fatal(err)
	}
	w, err := s.Create("c")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(testBody("c", 100))
	syncs := s.sync.Syncs()
	if err := w.Commit(testEnv("c")); err != nil {
		t.Fatal(err)
	}
	if s.sync.Syncs() != syncs+1 || w.durable {
		t.Errorf("beside y's intake c's commit took %d syncfs (fdatasync: %v), want one syncfs", s.sync.Syncs()-syncs, w.durable)
	}
	other.Abort()
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{".free-a", "dead"}) || placedIn(s, "c") != "a" {
		t.Errorf("beside y's intake c was left in %v (placed in %q); want it in a's file, unrenamed", got, placedIn(s, "c"))
	}
	fi, err := os.Stat(s.live("c"))
	if err != nil || !os.SameFile(a, fi) {
		t.Errorf("c is not in a's file: %v", err)
	}
	if got := readBody(t, s, "c"); !bytes.Equal(got, testBody("c", 100)) {
		t.Error("c's body differs")
	}
}

func TestPool_LoadAdoptsFreeFilesAndAFullDiskDrainsThem(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	for _, id := range []string{"a", "b"} {
		put(t, s, testEnv(id), testBody(id, 100))
		s.Remove(id)
	}
	s.reapNow()
	s2, err := Open(s.dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s2.manualReap = true
	if _, _, err := s2.Load(); err != nil {
		t.Fatal(err)
	}
	if n := len(s2.pool.soon) + len(s2.pool.ready); n != 2 {
		t.Errorf("Load adopted %d free files, want 2", n)
	}
	put(t, s2, testEnv("c"), testBody("c", 100))
	s2.noteFull(syscall.ENOSPC)
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"c.msg", "dead"}) {
		t.Errorf("after a full disk = %v, want the free files gone", got)
	}
	// Until a commit succeeds again, a delivered file is space to give back.
	s2.Remove("c")
	s2.reapNow()
	if got := dirNames(t, s.dir); !slices.Equal(got, []string{"dead"}) {
		t.Errorf("a delivery on a full disk = %v, want c unlinked, not kept", got)
	}
}

// A sync that failed made nothing durable: it must not count towards a
// free file's two syncs (the spool refuses commits after it anyway).
func TestPool_FailedSyncsDoNotMakeFilesReady(t *testing.T) {
	fsys := &fullFS{left: -1, free: 100 << 20}
	s, err := Open(t.TempDir(), Options{FS: fsys})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap = true
	put(t, s, testEnv("a"), testBody("a", 100))
	s.Remove("a")
	s.reapNow()
	if err := s.sync.Sync(); err != nil { // one good sync since the rename
		t.Fatal(err)
	}
	fsys.syncErr = syscall.EIO
	if s.sync.Sync() == nil {
		t.Fatal("sync did not fail")
	}
	if _, ok := s.take(); ok {
		t.Error("a free file became ready through failed syncs")
	}
}

// noReplaceFS is a file system without RENAME_NOREPLACE.
type noReplaceFS struct{ OS }

func (noReplaceFS) RenameNoReplace(oldpath, newpath string) error {
	return &os.LinkError{Op: "renameat2", Old: oldpath, New: newpath, Err: errors.ErrUnsupported}
}

func TestPool_WithoutRenameNoReplaceCloseNamesByACheckedRename(t *testing.T) {
	s, err := Open(t.TempDir(), Options{FS: noReplaceFS{}})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap = true
	for _, id := range []string{"a", "b", "c"} {
		put(t, s, testEnv(id), testBody(id, 100))
		s.Remove(id)
	}
	s.reapNow()
	for range 2 {
		s.sync.Sync()
	}
	// Messages are written over free files and renamed nowhere, so
	// nothing needs RENAME_NOREPLACE until Close names them.
	put(t, s, testEnv("d"), testBody("d", 100))
	w, err := s.Create("e")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(testBody("e", 100))
	if err := w.Commit(testEnv("e")); err != nil {
		t.Fatal(err)
	}
	if placedIn(s, "d") == "" || placedIn(s, "e") == "" {
		t.Fatalf("d and e not placed (%q, %q)", placedIn(s, "d"), placedIn(s, "e"))
	}
	// Close's rename finds that the file system cannot: a checked rename
	// names d and e; the third free file stays in the pool.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, s.dir); len(got) != 4 || !strings.HasPrefix(got[0], freePrefix) || !slices.Equal(got[1:], []string{"d.msg", "dead", "e.msg"}) {
		t.Errorf("spool = %v, want d.msg, e.msg and one free file", got)
	}
	for _, id := range []string{"d", "e"} {
		if got := readBody(t, s, id); !bytes.Equal(got, testBody(id, 100)) {
			t.Errorf("%s, named by the checked rename, lost its body", id)
		}
	}
	// A checked rename still refuses a name in use.
	put(t, s, testEnv("f"), testBody("f", 100))
	if err := s.renameNoReplace(s.live("f"), s.live("d")); !errors.Is(err, fs.ErrExist) {
		t.Errorf("checked rename over a queued message = %v, want fs.ErrExist", err)
	}
}

// closeFailFS fails the close of a free file opened to be written over,
// after its fdatasync, as a file system that reports a late write error
// at close does.
type closeFailFS struct{ *crashFS }

func (f closeFailFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	fl, err := f.crashFS.OpenFile(name, flag, perm)
	if err == nil && flag&os.O_RDWR != 0 && strings.HasPrefix(filepath.Base(name), freePrefix) {
		return closeFail{fl.(*crashFile)}, nil
	}
	return fl, err
}

type closeFail struct{ *crashFile }

func (c closeFail) Close() error {
	c.crashFile.Close()
	return syscall.EIO
}

// crashDelivered leaves a ready free file, a's, in s.
func crashDelivered(t *testing.T, s *Spool) {
	t.Helper()
	put(t, s, testEnv("a"), testBody("a", 2000))
	if err := s.Remove("a"); err != nil {
		t.Fatal(err)
	}
	s.reapNow()
	for range 2 {
		if err := s.sync.Sync(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPool_RefusedAfterItsFdatasyncIsNotLoaded(t *testing.T) {
	disk := newCrashFS(crashDir, crashDir+"/dead")
	s, err := Open(crashDir, Options{FS: closeFailFS{disk}, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap = true
	crashDelivered(t, s)
	w, err := s.Create("c")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(testBody("c", 100))
	if err := w.Commit(testEnv("c")); !errors.Is(err, syscall.EIO) || !w.durable {
		t.Fatalf("Commit = %v (durable %v), want EIO from the close after the fdatasync", err, w.durable)
	}
	// The client heard 4xx; the power fails before anything else syncs.
	disk.crashed = true
	envs, _, err := openCrash(t, disk.reboot(lostAll)).Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range envs {
		if e.ID == "c" {
			t.Fatal("c, refused with 4xx, was loaded for delivery")
		}
	}
}

func TestPool_LoneCommitRefusedAfterAFailedSync(t *testing.T) {
	fsys := &fullFS{left: -1, free: 100 << 20}
	s, err := Open(t.TempDir(), Options{FS: fsys})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap = true
	delivered(t, s, "a", 100)
	fsys.syncErr = syscall.EIO
	if s.sync.Sync() == nil {
		t.Fatal("sync did not fail")
	}
	w, err := s.Create("c")
	if err != nil {
		t.Fatal(err)
	}
	if w.free == "" {
		t.Fatal("c did not take a's free file in place")
	}
	w.Write(testBody("c", 100))
	if err := w.Commit(testEnv("c")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("lone Commit after a failed sync = %v, want the sync's EIO", err)
	}
}

func TestPool_NoReplaceFSLoneCommitOfAQueuedIDFails(t *testing.T) {
	s, err := Open(t.TempDir(), Options{FS: noReplaceFS{}})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap = true
	put(t, s, testEnv("x"), testBody("x", 100))
	// A ready free file: messages are written over it in place, so the
	// commit has no RENAME_NOREPLACE to refuse a queued id; the claim does.
	put(t, s, testEnv("a"), testBody("a", 100))
	s.Remove("a")
	s.reapNow()
	for range 2 {
		s.sync.Sync()
	}
	commitQueuedX(t, s)
}

// A placed message's file goes back to the pool under a name that is not
// its id. Writes of the next message over it may reach the disk in any
// order; whatever part of them survives, a delivered message must read as
// free: never loaded again, never quarantined.
func TestPool_DeliveredPlacedFileReadsFreeUnderATornReuse(t *testing.T) {
	for _, torn := range []string{"records", "body and records"} {
		t.Run(torn, func(t *testing.T) {
			s := newTestSpool(t)
			s.manualReap = true
			delivered(t, s, "a", 100)
			put(t, s, testEnv("c"), testBody("c", 3000))
			free := placedIn(s, "c")
			if free == "" {
				t.Fatal("c was not placed")
			}
			env, err := s.Get("c")
			if err != nil {
				t.Fatal(err)
			}
			for i := 1; i <= 5; i++ {
				env.Attempts = i
				if err := s.Update(env); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Remove("c"); err != nil {
				t.Fatal(err)
			}
			s.reapNow()
			for range 2 {
				s.sync.Sync()
			}
			// The power fails while z, longer than c, is written over the
			// file: its first page (z's placeholder) is lost, a later one
			// kept, over c's records or over the end of c's body.
			p := s.freePath(free)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			for i := headerSize + len(testBody("c", 3000)) + 400; i < len(b); i++ {
				b[i] = 'z'
			}
			if torn == "body and records" {
				for i := headerSize + 100; i < headerSize+200; i++ {
					b[i] = 'z'
				}
			}
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			s2, err := Open(s.dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			envs, broken, err := s2.Load()
			if err != nil || len(envs) != 0 || broken != 0 {
				t.Fatalf("Load = %v, %d broken, %v; want the delivered c neither loaded nor quarantined (spool %v)", envs, broken, err, dirNames(t, s.dir))
			}
		})
	}
}

// While a message's commit is under way in a pool file (waiting for the
// shared syncfs, say), its id is taken: a second Create of it fails at its
// O_EXCL, and a refused commit takes the claim back.
func TestPool_ClaimedIDIsTakenUntilTheCommitEnds(t *testing.T) {
	s := newTestSpool(t)
	s.manualReap = true
	delivered(t, s, "a", 100)
	w, err := s.Create("x")
	if err != nil || w.free != "a" {
		t.Fatalf("Create(x) = %v, free %q; want a's free file", err, w.free)
	}
	w.Write(testBody("x", 100))
	if err := w.claim(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create("x"); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create of an id being committed = %v, want fs.ErrExist", err)
	}
	w.Abort()
	if placedIn(s, "x") != "" {
		t.Error("the aborted commit kept its claim")
	}
	put(t, s, testEnv("x"), testBody("x", 100))
	if got := readBody(t, s, "x"); !bytes.Equal(got, testBody("x", 100)) {
		t.Error("x after the aborted claim")
	}
}
