package relay

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

// mountSmallTmpfs mounts a tmpfs of the given size on a fresh directory,
// or skips where mounting is not allowed (not root, no CAP_SYS_ADMIN).
func mountSmallTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput()
	if err != nil {
		t.Skipf("cannot mount a tmpfs here (%v: %s); the fake-statfs tests cover readiness", err, strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dir, err, out)
		}
	})
	return dir
}

// fillDisk writes path until the file system reports ENOSPC (bounded: at
// most 64 MiB).
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := bytes.Repeat([]byte("x"), 16<<10)
	for range 4096 {
		if _, err := f.Write(chunk); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return
			}
			t.Fatal(err)
		}
	}
	t.Fatal("the file system never filled up")
}

func readyz(t *testing.T, tr *testRelay) int {
	t.Helper()
	code, _, _ := adminReq(t, tr, http.MethodGet, "/readyz", "", nil)
	return code
}

// Models the spool volume filling up (another writer, or mail piling up
// while the upstream is down): every message now gets 451, so the pod must
// leave the Service until space is freed. An empty probe file still fits
// on a full disk, so creating one proved nothing.
func TestReadyz_RealTmpfsFullAndRecovers(t *testing.T) {
	small := mountSmallTmpfs(t, "600k")
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, func(c *Config) { c.Spool.Dir = filepath.Join(small, "spool") })
	waitFor(t, "/readyz 200 on an empty 600k spool", func() bool { return readyz(t, tr) == http.StatusOK })
	filler := filepath.Join(small, "filler")
	fillDisk(t, filler)
	if code := readyz(t, tr); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz on a full spool file system = %d, want 503", code)
	}
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); smtpCode(err) != 451 {
		t.Errorf("send on a full disk = %v, want 451", err)
	}
	if code := readyz(t, tr); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz after a 451 = %d, want 503", code)
	}
	os.Remove(filler)
	if code := readyz(t, tr); code != http.StatusOK {
		t.Errorf("/readyz after space was freed = %d, want 200", code)
	}
	if err := tr.send("a@example.com", []string{"b@example.net"}, simpleMsg); err != nil {
		t.Errorf("send after space was freed: %v", err)
	}
}

// fakeSpace makes s report sp from statfs; the test changes sp as it goes.
func fakeSpace(s *Spool, sp *space) {
	s.statfs = func(string) (space, error) { return *sp, nil }
}

func TestSpool_ReadyWantsRoomForTheLargestMessage(t *testing.T) {
	const need = 25 << 20
	for _, tc := range []struct {
		name string
		sp   space
		full bool
	}{
		{"plenty", space{Avail: 10 << 30, Total: 100 << 30}, false},
		{"exactly one message", space{Avail: need + commitOverhead, Total: 100 << 30}, false},
		{"one byte short", space{Avail: need + commitOverhead - 1, Total: 100 << 30}, true},
		{"1 MiB left", space{Avail: 1 << 20, Total: 100 << 30}, true},
		// A volume smaller than ten maximum-size messages is asked for a
		// tenth of itself, or it would never be ready.
		{"small volume, room for small mail", space{Avail: 500 << 10, Total: 600 << 10}, false},
		{"small volume, full", space{Avail: 10 << 10, Total: 600 << 10}, true},
		{"out of inodes", space{Avail: 10 << 30, Total: 100 << 30, FreeFiles: 2, Files: 1000}, true},
		{"no fixed inode count", space{Avail: 10 << 30, Total: 100 << 30}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestSpool(t)
			sp := tc.sp
			fakeSpace(s, &sp)
			err := s.Ready(need)
			if tc.full != errors.Is(err, errSpoolFull) || (!tc.full && err != nil) {
				t.Errorf("Ready(%d) with %+v = %v, want full %v", need, tc.sp, err, tc.full)
			}
		})
	}
	s := newTestSpool(t)
	s.statfs = func(string) (space, error) { return space{}, syscall.EIO }
	if err := s.Ready(need); err == nil {
		t.Error("Ready with a failing statfs = nil, want an error")
	}
}

// Models commits failing with ENOSPC although statfs still shows some
// room (several sessions committing at once, metadata, a small volume):
// not ready until space is freed or a commit succeeds again.
func TestSpool_ReadyAfterCommitFailedForSpace(t *testing.T) {
	s := newTestSpool(t)
	sp := space{Avail: 80 << 10, Total: 600 << 10}
	fakeSpace(s, &sp)
	if err := s.Ready(25 << 20); err != nil {
		t.Fatalf("Ready before any failure = %v", err)
	}
	s.fs = failingFS{after: 0}
	if err := s.Put(testEnv(NewID(time.Now())), bytes.Repeat([]byte("x"), 100<<10)); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Put = %v, want ENOSPC", err)
	}
	if err := s.Ready(25 << 20); !errors.Is(err, errSpoolFull) {
		t.Errorf("Ready after a commit failed for space = %v, want full", err)
	}
	sp.Avail = 200 << 10 // deliveries freed space
	if err := s.Ready(25 << 20); err != nil {
		t.Errorf("Ready after space was freed = %v", err)
	}
	sp.Avail = 80 << 10
	if err := s.Ready(25 << 20); err != nil {
		t.Errorf("Ready once recovered = %v; only a new failure may turn it off", err)
	}

	s.Put(testEnv(NewID(time.Now())), []byte("x"))
	if err := s.Ready(25 << 20); !errors.Is(err, errSpoolFull) {
		t.Errorf("Ready after a second failure = %v, want full", err)
	}
	s.fs = atomicfile.OS{}
	if err := s.Put(testEnv(NewID(time.Now())), []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.Ready(25 << 20); err != nil {
		t.Errorf("Ready after a successful commit = %v", err)
	}
}

// The sticky sync failure stays fatal for readiness whatever the space.
func TestSpool_ReadyStickySyncFailure(t *testing.T) {
	s := newTestSpool(t)
	sp := space{Avail: 10 << 30, Total: 100 << 30}
	fakeSpace(s, &sp)
	s.sync = &atomicfile.GroupSync{Dir: filepath.Join(t.TempDir(), "gone")}
	if err := s.sync.Sync(); err == nil {
		t.Fatal("sync of a missing directory succeeded")
	}
	if err := s.Ready(1); err == nil {
		t.Error("Ready after a failed sync = nil, want the sticky error")
	}
}

// /readyz answers from the listener's own size limit.
func TestReadyz_FullFileSystemIs503(t *testing.T) {
	tr := startRelay(t, []*recorder{{name: "a"}}, nil, nil)
	sp := space{Avail: 10 << 30, Total: 100 << 30}
	fakeSpace(tr.spool, &sp) // no session runs, so only this goroutine reads it
	waitFor(t, "Run to start", tr.ready.Load)
	h := tr.adminHandler()
	get := func() (int, string) {
		req := httptest.NewRequest(http.MethodGet, "/readyz", nil)
		req.Host = "127.0.0.1:9025"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	if code, body := get(); code != http.StatusOK {
		t.Fatalf("/readyz = %d %s", code, body)
	}
	sp.Avail = uint64(tr.maxBytes) // the body fits, the envelope does not
	if code, body := get(); code != http.StatusServiceUnavailable || !strings.Contains(body, "full") {
		t.Errorf("/readyz with %d bytes free for %d-byte messages = %d %q, want 503 full", sp.Avail, tr.maxBytes, code, body)
	}
	sp.Avail = 1 << 30
	if code, body := get(); code != http.StatusOK {
		t.Errorf("/readyz after space was freed = %d %s", code, body)
	}
}
