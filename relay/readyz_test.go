package relay

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/relaycar/relaycar/internal/testwait"
	"github.com/relaycar/relaycar/relay/spool"
)

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
	small := testwait.Tmpfs(t, "600k")
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

// statFS reports a fixed statfs; the test changes u as it goes.
type statFS struct {
	spool.OS
	mu sync.Mutex
	u  spool.Usage
}

func (f *statFS) Statfs(string) (spool.Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.u, nil
}

func (f *statFS) setFree(n int64) {
	f.mu.Lock()
	f.u.FreeBytes = n
	f.mu.Unlock()
}

// /readyz answers from the listener's own size limit.
func TestReadyz_FullFileSystemIs503(t *testing.T) {
	fsys := &statFS{u: spool.Usage{FreeBytes: 10 << 30, TotalBytes: 100 << 30, FreeInodes: -1}}
	tr := startRelayTB(t, []*recorder{{name: "a"}}, nil, nil, true, nil, fsys)
	waitFor(t, "Run to start", tr.ready.Load)
	h := tr.api.handler()
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
	fsys.setFree(tr.size.Load()) // the body fits, the envelope does not
	if code, body := get(); code != http.StatusServiceUnavailable || !strings.Contains(body, "full") {
		t.Errorf("/readyz with %d bytes free for %d-byte messages = %d %q, want 503 full", tr.size.Load(), tr.size.Load(), code, body)
	}
	fsys.setFree(1 << 30)
	if code, body := get(); code != http.StatusOK {
		t.Errorf("/readyz after space was freed = %d %s", code, body)
	}
}
