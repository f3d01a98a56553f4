package spool

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"testing"
	"time"
)

// at is a fixed clock: crash workloads must write the same bytes on
// every run.
func at(sec int) time.Time {
	return time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).Add(time.Duration(sec) * time.Second)
}

func testEnv(id string, rcpts ...string) *Envelope {
	if len(rcpts) == 0 {
		rcpts = []string{"b@example.net"}
	}
	return &Envelope{ID: id, From: "app@example.com", Rcpts: rcpts, MessageID: "<" + id + "@example.com>",
		ReceivedAt: at(0), NextAttempt: at(0), RemoteAddr: "127.0.0.1:40000",
		Routes: []RouteState{{Route: "default", Pending: slices.Clone(rcpts)}}}
}

// testBody is n bytes of a plausible message, different per id.
func testBody(id string, n int) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "Message-ID: <%s@example.com>\r\nSubject: %s\r\n\r\n", id, id)
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %06d of %s\r\n", i, id)
	}
	return b.Bytes()[:n]
}

func newTestSpool(t *testing.T) *Spool {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "spool"), Options{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// put stores a message the way a session does.
func put(t *testing.T, s *Spool, env *Envelope, body []byte) {
	t.Helper()
	w, err := s.Create(env.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(env); err != nil {
		t.Fatal(err)
	}
}

func readBody(t *testing.T, s *Spool, id string) []byte {
	t.Helper()
	b, err := s.OpenBody(id)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	data, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// deadBody reads a dead letter's body straight from its file.
func deadBody(s *Spool, id string) ([]byte, error) {
	f, err := s.fs.OpenFile(s.deadPath(id), os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, _, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(io.NewSectionReader(f, h.bodyOff, h.bodyLen))
}

// stateJSON is an envelope as compared across runs: the format version
// a record was written with is not part of the state.
func stateJSON(env *Envelope) string {
	e := *env
	e.Version = 0
	b, _ := json.Marshal(&e)
	return string(b)
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

// v1Pair renders a message as v1 wrote it: the .eml, and the .json with
// size and body_crc set (indented, as v1's encodeEnvelope did).
func v1Pair(env *Envelope, body []byte) (eml, js []byte) {
	env.Size, env.BodyCRC = len(body), crcHex(body)
	js, _ = json.MarshalIndent(env, "", "  ")
	return body, js
}

func crcHex(b []byte) string {
	return hexCRC(crc32c(b))
}
