package spool

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// copyFixture copies testdata/v1 (written by the v1 binary, see
// tools/make-spool-fixture.sh) so that Load can change it.
func copyFixture(t *testing.T) (dir string, v1 map[string]*Envelope, bodies map[string][]byte) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "spool")
	v1, bodies = map[string]*Envelope{}, map[string][]byte{}
	err := filepath.Walk("testdata/v1", func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("testdata/v1", path)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		id := strings.TrimSuffix(fi.Name(), filepath.Ext(fi.Name()))
		switch filepath.Ext(fi.Name()) {
		case ".json":
			var e Envelope
			if err := json.Unmarshal(b, &e); err != nil {
				return err
			}
			v1[id] = &e
		case ".eml":
			bodies[id] = b
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir, v1, bodies
}

// The upgrade: a spool the v1 binary left (queued, partially delivered,
// split across routes, dead-lettered) is loaded by v2 with every
// recipient's state kept, so nobody already delivered gets the message
// again, and every body intact.
func TestV1Fixture(t *testing.T) {
	dir, v1, bodies := copyFixture(t)
	if len(v1) != 5 {
		t.Fatalf("fixture has %d envelopes, want 5", len(v1))
	}
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, broken, err := s.Load()
	if err != nil || broken != 0 {
		t.Fatalf("Load = %d broken, %v", broken, err)
	}
	dead, _ := s.Dead()
	byMsgID := map[string]*Envelope{}
	for _, e := range append(slices.Clone(envs), dead...) {
		byMsgID[e.MessageID] = e
		old := v1[e.ID]
		if old == nil {
			t.Fatalf("%s was not in the fixture", e.ID)
		}
		if stateJSON(e) != stateJSON(old) {
			t.Errorf("%s changed in migration:\n%s\nv1:\n%s", e.ID, stateJSON(e), stateJSON(old))
		}
		var body []byte
		if e.DeadReason == "" {
			body = readBody(t, s, e.ID)
		} else {
			body, _ = deadBody(s, e.ID)
		}
		if !bytes.Equal(body, bodies[e.ID]) || crcHex(body) != old.BodyCRC || e.Size != len(body) {
			t.Errorf("%s: body of %d bytes (crc %s), v1 had %d (crc %s)", e.ID, len(body), crcHex(body), len(bodies[e.ID]), old.BodyCRC)
		}
	}
	if len(envs) != 4 || len(dead) != 1 || s.CountDead() != 1 {
		t.Fatalf("%d live, %d dead; want 4 and 1", len(envs), len(dead))
	}
	pending := func(e *Envelope) (out []string) {
		for _, r := range e.Routes {
			for _, p := range r.Pending {
				out = append(out, r.Route+":"+p)
			}
		}
		return out
	}
	delivered := func(e *Envelope) (out []string) {
		for _, d := range e.Deliveries {
			for _, r := range d.Rcpts {
				out = append(out, d.Route+":"+r)
			}
		}
		return out
	}
	for _, want := range []struct {
		name               string
		pending, delivered []string
	}{
		{"queued-1", []string{"default:ok@example.net"}, nil},
		{"queued-2", []string{"default:ok@example.net"}, nil},
		{"partial", []string{"default:later@example.net"}, []string{"default:ok@example.net"}},
		{"split", []string{"partners:later@partner.example"}, []string{"default:ok@example.net"}},
	} {
		e := byMsgID["<fixture-"+want.name+"@example.com>"]
		if e == nil || e.DeadReason != "" {
			t.Errorf("%s: not live after migration: %+v", want.name, e)
			continue
		}
		if !slices.Equal(pending(e), want.pending) || !slices.Equal(delivered(e), want.delivered) || e.Attempts != 1 || e.LastError == "" {
			t.Errorf("%s: pending %v delivered %v attempts %d; want %v %v 1", want.name, pending(e), delivered(e), e.Attempts, want.pending, want.delivered)
		}
	}
	d := byMsgID["<fixture-dead@example.com>"]
	if d == nil || !strings.Contains(d.DeadReason, "550 5.1.1") || d.DeadAt == nil || len(d.Failures) != 1 || !slices.Equal(d.Failures[0].Rcpts, []string{"reject@example.net"}) {
		t.Errorf("dead letter after migration: %+v", d)
	}
	// The v1 files are gone; the lock file stays.
	for _, sub := range []string{dir, s.dead} {
		for _, n := range dirNames(t, sub) {
			if strings.HasSuffix(n, ".eml") || strings.HasSuffix(n, ".json") {
				t.Errorf("v1 file %s left after migration", filepath.Join(sub, n))
			}
		}
	}
	if got := dirNames(t, dir); !slices.Contains(got, ".lock") || len(got) != 6 {
		t.Errorf("spool after migration = %v, want .lock, dead and 4 .msg", got)
	}
	// And it is a working v2 spool: the dead letter can be retried.
	back, err := s.Resurrect(d.ID, at(0))
	if err != nil || !slices.Equal(pending(back), []string{"default:reject@example.net"}) {
		t.Errorf("Resurrect after migration = %+v, %v", back, err)
	}
	if again, b2, err := s.Load(); err != nil || b2 != 0 || len(again) != 5 {
		t.Errorf("second Load = %d envs, %d broken, %v", len(again), b2, err)
	}
}

// A previous release's pool: its reaper renamed delivered files to
// .free-<id>, with or without a durable done record. Load of this release
// reads free files by their contents, and such a file must go back to the
// pool: neither delivered again nor quarantined.
func TestFixture_PreviousReleasesFreeFilesGoBackToThePool(t *testing.T) {
	const fixture = "testdata/v2-1721dd1"
	entries, err := os.ReadDir(fixture)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "spool")
	if err := os.MkdirAll(filepath.Join(dir, "dead"), 0o700); err != nil {
		t.Fatal(err)
	}
	var free []string
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".msg")
		if !ok {
			continue
		}
		b, err := os.ReadFile(filepath.Join(fixture, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		// Written by that release, delivered, its done record lost.
		if err := os.WriteFile(filepath.Join(dir, freePrefix+id), b, 0o600); err != nil {
			t.Fatal(err)
		}
		free = append(free, freePrefix+id)
	}
	if len(free) == 0 {
		t.Fatal("no .msg files in the fixture")
	}
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, broken, err := s.Load()
	if err != nil || len(envs) != 0 || broken != 0 {
		t.Fatalf("Load = %d envelopes, %d broken, %v; want the free files back in the pool", len(envs), broken, err)
	}
	want := append(free, "dead")
	slices.Sort(want)
	if got := dirNames(t, dir); !slices.Equal(got, want) {
		t.Errorf("spool = %v, want %v", got, want)
	}
	if n := len(s.pool.soon) + len(s.pool.ready); n != len(free) {
		t.Errorf("pool holds %d files, want %d", n, len(free))
	}
}

// The done record of a message written by the previous release (queued,
// partly delivered over several envelope records, or dead) is appended
// where that release's records end: readTail, which matches envelope
// records by their id key, agrees with readState, which decodes them.
func TestFixture_ReadTailOfPreviousReleasesFiles(t *testing.T) {
	const fixture = "testdata/v2-1721dd1"
	paths, err := filepath.Glob(filepath.Join(fixture, "*.msg"))
	if err != nil {
		t.Fatal(err)
	}
	dead, err := filepath.Glob(filepath.Join(fixture, "dead", "*.msg"))
	if err != nil {
		t.Fatal(err)
	}
	paths = append(paths, dead...)
	if len(paths) != 5 {
		t.Fatalf("fixture has %d .msg files, want its 4 live ones and a dead letter", len(paths))
	}
	for _, path := range paths {
		id := strings.TrimSuffix(filepath.Base(path), ".msg")
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		full, err := readState(f, id)
		if err != nil {
			t.Fatal(err)
		}
		tail, err := readTail(f, id)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if full.env == nil || full.recordBytes() == 0 {
			t.Fatalf("%s: readState found no envelope", path)
		}
		if tail.end != full.end || tail.last != full.last || tail.done != full.done {
			t.Errorf("%s: readTail ends at %d (crc %08x, done %v), readState at %d (crc %08x, done %v)",
				path, tail.end, tail.last, tail.done, full.end, full.last, full.done)
		}
	}
}
