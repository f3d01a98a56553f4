package spool

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// Every state a v1 spool can be left in (relay/spool.go of v1 and its
// Load), migrated by the first start of v2.
func TestMigrateV1States(t *testing.T) {
	s := newTestSpool(t)
	write := func(dir, name string, b []byte) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pair := func(envDir, bodyDir string, env *Envelope) {
		eml, js := v1Pair(env, testBody(env.ID, 1500))
		write(bodyDir, env.ID+".eml", eml)
		write(envDir, env.ID+".json", js)
	}
	dead := func(id string) *Envelope {
		e := testEnv(id)
		e.Routes[0].Pending = nil
		e.Failures = []Failure{{Route: "default", Class: "rejected", Rcpts: []string{"b@example.net"}, Reason: "550 5.1.1", At: at(1)}}
		e.DeadReason, e.DeadAt = "b@example.net: 550 5.1.1", new(at(1))
		return e
	}
	want := map[string]*Envelope{} // id → migrated state
	wantDead := map[string]*Envelope{}

	live := testEnv("live")
	pair(s.dir, s.dir, live)
	want["live"] = live

	part := testEnv("part", "ok@example.net", "later@example.net")
	part.Routes[0].Pending = []string{"later@example.net"}
	part.Deliveries = []Delivery{{Route: "default", Upstream: "sink", Rcpts: []string{"ok@example.net"}, At: at(1)}}
	part.Attempts, part.LastError = 1, "451 4.2.0"
	pair(s.dir, s.dir, part)
	want["part"] = part

	old := testEnv("old") // before v1 had body_crc
	eml, _ := v1Pair(old, testBody("old", 1500))
	js := []byte(`{"id":"old","from":"app@example.com","rcpts":["b@example.net"],"routes":[{"route":"default","pending":["b@example.net"]}],"received_at":"2026-03-01T12:00:00Z","next_attempt":"2026-03-01T12:00:00Z"}`)
	write(s.dir, "old.eml", eml)
	write(s.dir, "old.json", js)

	d := dead("dead")
	pair(s.dead, s.dead, d)
	wantDead["dead"] = d

	// v1 Bury wrote dead/<id>.json, then moved the body, then removed the
	// live .json; a crash can stop it after either step.
	ib := dead("burybody")
	pair(s.dir, s.dir, testEnv("burybody"))
	_, js = v1Pair(ib, testBody("burybody", 1500))
	write(s.dead, "burybody.json", js)
	wantDead["burybody"] = ib

	ib2 := dead("buryjson")
	pair(s.dir, s.dead, testEnv("buryjson"))
	_, js = v1Pair(ib2, testBody("buryjson", 1500))
	write(s.dead, "buryjson.json", js)
	wantDead["buryjson"] = ib2

	// v1 Resurrect moved the body back before removing dead/<id>.json:
	// still dead.
	ir := dead("retry")
	pair(s.dead, s.dir, ir)
	wantDead["retry"] = ir

	// Already migrated before a crash took the v1 files' removal.
	am := testEnv("migrated")
	pair(s.dir, s.dir, am)
	put(t, s, func() *Envelope { e := testEnv("migrated"); e.Attempts = 5; return e }(), testBody("migrated", 1500))

	// Broken: body without envelope, unparseable envelope, envelope
	// without body, body that fails its CRC.
	write(s.dir, "orphan.eml", []byte("Subject: lost\r\n\r\n"))
	pair(s.dir, s.dir, testEnv("garbled"))
	write(s.dir, "garbled.json", []byte(`{"id": "garb`))
	pair(s.dir, s.dir, testEnv("nobody"))
	os.Remove(filepath.Join(s.dir, "nobody.eml"))
	pair(s.dir, s.dir, testEnv("torn"))
	write(s.dir, "torn.eml", []byte("torn"))
	write(s.dir, ".tmp-12345", []byte("v1 temp"))
	write(s.dead, ".tmp-678", []byte("v1 temp"))
	write(s.dir, "kept.json.broken", []byte("quarantined by v1"))

	envs, broken, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if broken != 4 {
		t.Errorf("broken = %d, want 4 (orphan, garbled, nobody, torn)", broken)
	}
	var ids []string
	for _, e := range envs {
		ids = append(ids, e.ID)
		if w := want[e.ID]; w != nil && stateJSON(e) != stateJSON(w) {
			t.Errorf("%s migrated as\n%s\nwant\n%s", e.ID, stateJSON(e), stateJSON(w))
		}
		if e.Version != FormatVersion || e.BodyCRC != crcHex(testBody(e.ID, 1500)) || e.Size != 1500 {
			t.Errorf("%s: v%d size %d crc %s", e.ID, e.Version, e.Size, e.BodyCRC)
		}
		if b := readBody(t, s, e.ID); !bytes.Equal(b, testBody(e.ID, 1500)) {
			t.Errorf("%s: body differs after migration", e.ID)
		}
	}
	if !slices.Equal(ids, []string{"live", "migrated", "old", "part"}) {
		t.Errorf("live after migration = %v", ids)
	}
	if e, _ := s.Get("migrated"); e.Attempts != 5 {
		t.Errorf("the v2 file of an already migrated message lost to v1 leftovers: %+v", e)
	}
	deadEnvs, _ := s.Dead()
	ids = nil
	for _, e := range deadEnvs {
		ids = append(ids, e.ID)
		if stateJSON(e) != stateJSON(wantDead[e.ID]) {
			t.Errorf("dead %s migrated as\n%s\nwant\n%s", e.ID, stateJSON(e), stateJSON(wantDead[e.ID]))
		}
		if b, _ := deadBody(s, e.ID); !bytes.Equal(b, testBody(e.ID, 1500)) {
			t.Errorf("dead %s: body differs after migration", e.ID)
		}
	}
	if !slices.Equal(ids, []string{"burybody", "buryjson", "dead", "retry"}) || s.CountDead() != 4 {
		t.Errorf("dead after migration = %v (CountDead %d)", ids, s.CountDead())
	}
	wantNames := []string{"dead", "garbled.eml.broken", "garbled.json.broken", "kept.json.broken", "live.msg", "migrated.msg",
		"nobody.json.broken", "old.msg", "orphan.eml.broken", "part.msg", "torn.eml.broken", "torn.json.broken"}
	if got := dirNames(t, s.dir); !slices.Equal(got, wantNames) {
		t.Errorf("spool after migration =\n%v\nwant\n%v", got, wantNames)
	}
	if got := dirNames(t, s.dead); !slices.Equal(got, []string{"burybody.msg", "buryjson.msg", "dead.msg", "retry.msg"}) {
		t.Errorf("dead/ after migration = %v", got)
	}
	if envs2, b2, err := s.Load(); err != nil || b2 != 0 || len(envs2) != 4 {
		t.Errorf("second Load = %d envs, %d broken, %v", len(envs2), b2, err)
	}
}

// Before the first v2 start, `relaycar queue ls` (the v2 binary) still
// shows a v1 spool, and retry by files says what to do.
func TestReadersSeeV1BeforeMigration(t *testing.T) {
	s := newTestSpool(t)
	env := testEnv("a")
	eml, js := v1Pair(env, []byte("body"))
	os.WriteFile(filepath.Join(s.dir, "a.eml"), eml, 0o600)
	os.WriteFile(filepath.Join(s.dir, "a.json"), js, 0o600)
	d := testEnv("d")
	d.DeadReason = "550"
	eml, js = v1Pair(d, []byte("body"))
	os.WriteFile(filepath.Join(s.dead, "d.eml"), eml, 0o600)
	os.WriteFile(filepath.Join(s.dead, "d.json"), js, 0o600)
	if l, _ := s.List(); len(l) != 1 || l[0].ID != "a" {
		t.Errorf("List = %v", l)
	}
	if l, _ := s.Dead(); len(l) != 1 || l[0].DeadReason != "550" || s.CountDead() != 1 {
		t.Errorf("Dead = %v", l)
	}
	if e, err := s.Get("a"); err != nil || e.ID != "a" {
		t.Errorf("Get = %v, %v", e, err)
	}
	if _, err := s.Resurrect("d", at(1)); err != errNotMigrated {
		t.Errorf("Resurrect of a v1 dead letter = %v", err)
	}
	if err := s.Drop("d"); err != nil || len(dirNames(t, s.dead)) != 0 {
		t.Errorf("Drop of a v1 dead letter = %v, left %v", err, dirNames(t, s.dead))
	}
}
