package spool

import (
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const crashDir = "/spool"

// crashRun is one run of the crash workload, against one spool.
type crashRun struct {
	sp   *Spool
	envs map[string]*Envelope
	w    map[string]*Writer
}

type crashStep struct {
	name string
	// syncs: the step ends with a syncfs when it returns nil, so all it
	// and earlier steps wrote is durable.
	syncs bool
	do    func(r *crashRun) error
}

// Message ids of the workload; v1* are seeded in the v1 format.
const (
	idV1Live   = "0v1live"
	idV1Part   = "0v1part"
	idV1Dead   = "0v1dead"
	idV1Bury   = "0v1bury"
	idV1Orphan = "0v1orphan"
	idA        = "1a"
	idB        = "1b"
	idC        = "1c"
	idD        = "1d"
	idE        = "1e"
	idF        = "1f"
	idG        = "1g"
)

func crashIDs() []string {
	return []string{idV1Live, idV1Part, idV1Dead, idV1Bury, idA, idB, idC, idD, idE, idF, idG}
}

// crashBody: B and E are larger than the intake buffer, so their bodies
// reach the disk in several writes before the commit; F is smaller than
// the delivered file it reuses, so that file's old bytes follow F's.
func crashBody(id string) []byte {
	switch id {
	case idB, idE:
		return testBody(id, 150<<10)
	case idF:
		return testBody(id, 500)
	}
	return testBody(id, 2000)
}

// seedV1 lays out a spool as v1 left it: a queued message, a partially
// delivered one, a dead letter, a dead-lettering interrupted before the
// body moved, a body without envelope, and a temp file.
func seedV1(c *crashFS) {
	put := func(dir string, env *Envelope) {
		eml, js := v1Pair(env, crashBody(env.ID))
		c.seed(filepath.Join(dir, env.ID+".eml"), eml)
		c.seed(filepath.Join(dir, env.ID+".json"), js)
	}
	put(crashDir, testEnv(idV1Live))
	part := testEnv(idV1Part, "ok@example.net", "later@example.net")
	part.Routes[0].Pending = []string{"later@example.net"}
	part.Deliveries = []Delivery{{Route: "default", Upstream: "sink", Rcpts: []string{"ok@example.net"}, At: at(1)}}
	part.Attempts, part.LastError = 1, "451 4.2.0 later"
	put(crashDir, part)
	dead := testEnv(idV1Dead)
	dead.Routes[0].Pending = nil
	dead.Failures = []Failure{{Route: "default", Upstream: "sink", Class: "rejected", Rcpts: []string{"b@example.net"}, Reason: "550 5.1.1 no such user", At: at(1)}}
	dead.DeadReason, dead.DeadAt = "b@example.net: 550 5.1.1 no such user", new(at(1))
	put(filepath.Join(crashDir, "dead"), dead)
	bury := testEnv(idV1Bury)
	put(crashDir, bury)
	bury.DeadReason, bury.DeadAt = "max age 48h0m0s exceeded after 9 attempts", new(at(2))
	_, js := v1Pair(bury, crashBody(idV1Bury))
	c.seed(filepath.Join(crashDir, "dead", idV1Bury+".json"), js)
	c.seed(filepath.Join(crashDir, idV1Orphan+".eml"), testBody(idV1Orphan, 100))
	c.seed(filepath.Join(crashDir, ".tmp-4711"), []byte("half a v1 envelope"))
}

// crashWorkload is every kind of operation of a serving relay, in a fixed
// order: accept (interleaved sessions), attempt, partial delivery,
// compaction, dead-letter, retry, delivery and reaper unlink or move into
// the pool, accept into a reused file, drop, and the v1 migration at start.
func crashWorkload() []crashStep {
	write := func(r *crashRun, id string, from, to int) error {
		_, err := r.w[id].Write(crashBody(id)[from:to])
		return err
	}
	create := func(r *crashRun, id string) error {
		w, err := r.sp.Create(id)
		r.w[id] = w
		return err
	}
	commit := func(r *crashRun, id string, rcpts ...string) error {
		env := testEnv(id, rcpts...)
		r.envs[id] = env
		return r.w[id].Commit(env)
	}
	half := func(id string) int { return len(crashBody(id)) / 2 }
	end := func(id string) int { return len(crashBody(id)) }
	return []crashStep{
		{"load: migrate v1", true, func(r *crashRun) error {
			envs, _, err := r.sp.Load()
			for _, e := range envs {
				r.envs[e.ID] = e
			}
			return err
		}},
		{"A: create, first half of DATA", false, func(r *crashRun) error {
			if err := create(r, idA); err != nil {
				return err
			}
			return write(r, idA, 0, half(idA))
		}},
		{"B: create, all of DATA", false, func(r *crashRun) error {
			if err := create(r, idB); err != nil {
				return err
			}
			return write(r, idB, 0, end(idB))
		}},
		{"A: rest of DATA, commit", true, func(r *crashRun) error {
			if err := write(r, idA, half(idA), end(idA)); err != nil {
				return err
			}
			return commit(r, idA)
		}},
		{"B: commit", true, func(r *crashRun) error { return commit(r, idB, bRcpts()...) }},
		{"C: client gone, abort", false, func(r *crashRun) error {
			if err := create(r, idC); err != nil {
				return err
			}
			if err := write(r, idC, 0, end(idC)); err != nil {
				return err
			}
			r.w[idC].Abort()
			return nil
		}},
		{"A: attempt fails", false, func(r *crashRun) error {
			e := r.envs[idA]
			e.Attempts, e.LastError, e.NextAttempt = 1, "dial tcp: connection refused", at(30)
			e.UpstreamErrors = map[string]string{"sink": "dial tcp: connection refused"}
			return r.sp.Update(e)
		}},
		{"B: partial delivery", false, func(r *crashRun) error {
			e := r.envs[idB]
			e.Deliveries = []Delivery{{Route: "default", Upstream: "sink", Rcpts: []string{"b1@example.net"}, At: at(5)}}
			e.Routes[0].Pending = bRcpts()[1:]
			e.Attempts, e.LastError, e.NextAttempt = 1, "451 4.2.0 mailbox busy", at(35)
			return r.sp.Update(e)
		}},
		{"B: attempt, compacts", false, func(r *crashRun) error {
			e := r.envs[idB]
			e.Attempts, e.NextAttempt = 2, at(95)
			e.UpstreamErrors = map[string]string{"sink": "451 4.2.0 mailbox busy"}
			return r.sp.Update(e)
		}},
		{"A: dead-letter", true, func(r *crashRun) error {
			e := r.envs[idA]
			e.Failures = []Failure{{Route: "default", Upstream: "sink", Class: "rejected", Rcpts: e.Routes[0].Pending, Reason: "550 5.7.1 refused", At: at(40)}}
			e.Routes[0].Pending = nil
			return r.sp.Bury(e, "b@example.net: 550 5.7.1 refused", at(40))
		}},
		{"A: operator retries", true, func(r *crashRun) error {
			e, err := r.sp.Resurrect(idA, at(50))
			r.envs[idA] = e
			return err
		}},
		{"B: delivered, remove", false, func(r *crashRun) error { return r.sp.Remove(idB) }},
		{"reaper unlinks B", false, func(r *crashRun) error { r.sp.reapNow(); return nil }},
		{"v1live: delivered, remove, reap", false, func(r *crashRun) error {
			err := r.sp.Remove(idV1Live)
			r.sp.reapNow()
			return err
		}},
		{"v1dead: operator drops", true, func(r *crashRun) error { return r.sp.Drop(idV1Dead) }},
		{"E: accept", true, func(r *crashRun) error {
			if err := create(r, idE); err != nil {
				return err
			}
			if err := write(r, idE, 0, end(idE)); err != nil {
				return err
			}
			return commit(r, idE)
		}},
		{"F: accept into v1live's reused file", true, func(r *crashRun) error {
			free := func() bool {
				_, _, _, ok := r.sp.fs.(*crashFS).lookup(r.sp.freePath(idV1Live))
				return ok
			}
			if !free() {
				return fmt.Errorf("%s is not in the pool", r.sp.freePath(idV1Live))
			}
			if err := create(r, idF); err != nil {
				return err
			}
			if r.w[idF].free != idV1Live {
				return fmt.Errorf("F did not reuse %s", r.sp.freePath(idV1Live))
			}
			if err := write(r, idF, 0, end(idF)); err != nil {
				return err
			}
			if err := commit(r, idF); err != nil {
				return err
			}
			// Alone, F stays where it was written: no rename.
			if !free() || placedIn(r.sp, idF) != idV1Live {
				return fmt.Errorf("F's commit moved it out of %s", r.sp.freePath(idV1Live))
			}
			return nil
		}},
		// After F, which commits alone (and so fdatasyncs, not syncfs);
		// D may take a free file and leave it half written.
		{"D: session still in DATA", false, func(r *crashRun) error {
			if err := create(r, idD); err != nil {
				return err
			}
			return write(r, idD, 0, end(idD))
		}},
		{"v1part: attempt", false, func(r *crashRun) error {
			e := r.envs[idV1Part]
			e.Attempts, e.NextAttempt = 2, at(600)
			return r.sp.Update(e)
		}},
		// F's file goes back to the pool as it is, under v1live's free
		// name.
		{"F: delivered, remove, reap", false, func(r *crashRun) error {
			err := r.sp.Remove(idF)
			r.sp.reapNow()
			return err
		}},
		{"two syncs (other sessions' commits)", true, func(r *crashRun) error {
			for range 2 {
				if err := r.sp.sync.Sync(); err != nil {
					return err
				}
			}
			return nil
		}},
		// Beside D's intake G is written over F's file too, commits
		// with the shared syncfs, and stays there.
		{"G: accept into F's reused file beside D", true, func(r *crashRun) error {
			if err := create(r, idG); err != nil {
				return err
			}
			if r.w[idG].free != idV1Live {
				return fmt.Errorf("G is written over %q, not %s", r.w[idG].free, r.sp.freePath(idV1Live))
			}
			if err := write(r, idG, 0, end(idG)); err != nil {
				return err
			}
			syncs := r.sp.sync.Syncs()
			if err := commit(r, idG); err != nil {
				return err
			}
			if r.sp.sync.Syncs() == syncs || r.w[idG].durable || placedIn(r.sp, idG) != idV1Live {
				return fmt.Errorf("G's commit beside D: no syncfs, or an fdatasync, or G moved")
			}
			return nil
		}},
	}
}

// bRcpts make B's records large enough that its third one triggers a
// compaction at crashCompactAt, and A's dead-lettering does not.
func bRcpts() []string {
	var out []string
	for i := 1; i <= 8; i++ {
		out = append(out, fmt.Sprintf("b%d@example.net", i))
	}
	return out
}

const crashCompactAt = 1900

func openCrash(t *testing.T, c *crashFS) *Spool {
	t.Helper()
	s, err := Open(crashDir, Options{FS: c, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.manualReap, s.compactAt = true, crashCompactAt
	return s
}

// runWorkload runs the steps until one fails and returns the index of the
// step the power failed in (len(steps) if none).
func runWorkload(t *testing.T, c *crashFS, steps []crashStep, after func(i int, s *Spool)) int {
	r := &crashRun{sp: openCrash(t, c), envs: map[string]*Envelope{}, w: map[string]*Writer{}}
	for i, st := range steps {
		err := st.do(r)
		if c.Crashed() {
			return i
		}
		if err != nil {
			t.Fatalf("step %q failed without a crash: %v", st.name, err)
		}
		if after != nil {
			after(i, r.sp)
		}
	}
	return len(steps)
}

// seen is where a message is and what it says.
type seen struct {
	where string // live, dead or absent
	state string
	body  string
}

func (o seen) String() string {
	if o.where == "absent" {
		return "absent"
	}
	return fmt.Sprintf("%s %s (body %d bytes)", o.where, o.state, len(o.body))
}

// observe reads the spool as the serving process sees it: live messages
// as Get returns them, dead ones as Dead lists them.
func observe(s *Spool, live []*Envelope) (map[string]seen, error) {
	out := map[string]seen{}
	for _, id := range crashIDs() {
		out[id] = seen{where: "absent"}
	}
	for _, e := range live {
		b, err := s.OpenBody(e.ID)
		if err != nil {
			return nil, err
		}
		data, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			return nil, err
		}
		out[e.ID] = seen{"live", stateJSON(e), string(data)}
	}
	dead, err := s.Dead()
	if err != nil {
		return nil, err
	}
	for _, e := range dead {
		if out[e.ID].where == "live" {
			return nil, fmt.Errorf("%s is live and dead at once", e.ID)
		}
		data, err := deadBody(s, e.ID)
		if err != nil {
			return nil, err
		}
		out[e.ID] = seen{"dead", stateJSON(e), string(data)}
	}
	return out, nil
}

// liveNow is the live set between steps of the reference run.
func liveNow(s *Spool) []*Envelope {
	var out []*Envelope
	for _, id := range crashIDs() {
		if e, err := s.Get(id); err == nil && e.DeadReason == "" && e.Version == FormatVersion {
			out = append(out, e)
		}
	}
	return out
}

// TestCrashPoints loses power after every operation of the workload, in
// each of the ways a disk can come back, reboots, and checks that
// everything acknowledged is loaded, with its body, in a state the spool
// wrote at or after the last sync; that nothing never committed is
// loaded; and that Load neither fails nor has work left for a second run.
func TestCrashPoints(t *testing.T) {
	steps := crashWorkload()

	// Reference run: the states after each step, and the operation count.
	ref := newCrashFS(crashDir, crashDir+"/dead")
	seedV1(ref)
	snaps := make([]map[string]seen, len(steps))
	if got := runWorkload(t, ref, steps, func(i int, s *Spool) {
		o, err := observe(s, liveNow(s))
		if err != nil {
			t.Fatalf("after %q: %v", steps[i].name, err)
		}
		snaps[i] = o
	}); got != len(steps) {
		t.Fatal("reference run crashed")
	}
	total := ref.ops
	compacted := func(id string) bool {
		return slices.ContainsFunc(ref.log, func(l string) bool { return strings.HasPrefix(l, "rename "+tempPath(crashDir, id)) })
	}
	if !slices.Contains(ref.log, "fsync "+filepath.Join(crashDir, freePrefix+idV1Live)) {
		t.Fatalf("want F committed alone over v1live's free file, with an fsync of that file:\n%s", strings.Join(ref.log, "\n"))
	}
	if !compacted(idB) || compacted(idA) {
		t.Fatalf("want B compacted and A not (A's dead-lettering must append); adjust crashCompactAt:\n%s", strings.Join(ref.log, "\n"))
	}
	for _, want := range []struct {
		id, where string
	}{{idV1Live, "live"}, {idV1Part, "live"}, {idV1Dead, "dead"}, {idV1Bury, "dead"}, {idA, "live"}, {idE, "live"}} {
		if got := snaps[0][want.id].where; want.id[0] == '0' && got != want.where {
			t.Fatalf("after migration %s is %s, want %s", want.id, got, want.where)
		}
	}
	// A crash before the migration finishes finds the v1 files, which
	// mean what the migration makes of them.
	initial := snaps[0]

	cases := 0
	for k := 0; k <= total; k++ {
		for v := survivor(0); v < nSurvivors; v++ {
			cases++
			disk := newCrashFS(crashDir, crashDir+"/dead")
			seedV1(disk)
			disk.crashAt = k
			if k == total {
				disk.crashAt = -1
			}
			c := runWorkload(t, disk, steps, nil)
			if k == total {
				disk.crashed = true // power lost after the last step
			}
			name := fmt.Sprintf("crash after op %d/%d (%s) in step %d %q, %s", k, total, ref.describe(k), c, stepName(steps, c), v)
			checkCrash(t, name, disk.reboot(v), v, steps, c, snaps, initial)
		}
	}
	t.Logf("%d crash points x %d survivor models = %d cases", total+1, nSurvivors, cases)
}

func stepName(steps []crashStep, c int) string {
	if c >= len(steps) {
		return "(after the last step)"
	}
	return steps[c].name
}

func checkCrash(t *testing.T, name string, disk *crashFS, v survivor, steps []crashStep, c int, snaps []map[string]seen, initial map[string]seen) {
	t.Helper()
	s := openCrash(t, disk)
	envs, _, err := s.Load()
	if err != nil {
		t.Fatalf("%s: Load: %v", name, err)
	}
	got, err := observe(s, envs)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	// floor: the last step that synced before the crash.
	floor := -1
	for j := 0; j < c; j++ {
		if steps[j].syncs {
			floor = j
		}
	}
	snap := func(j int) map[string]seen {
		if j < 0 {
			return initial
		}
		return snaps[j]
	}
	last := min(c, len(steps)-1)
	for _, id := range crashIDs() {
		var allowed []seen
		for j := floor; j <= last; j++ {
			allowed = append(allowed, snap(j)[id])
		}
		if !slices.Contains(allowed, got[id]) {
			t.Errorf("%s: %s is %v; allowed: %v", name, id, got[id], allowed)
		}
		acked := snap(floor)[id]
		if acked.where != "absent" && got[id].where == "absent" && !slices.ContainsFunc(allowed, func(o seen) bool { return o.where == "absent" }) {
			t.Errorf("%s: acknowledged %s lost", name, id)
		}
	}
	// Never committed: C aborted, D still in DATA.
	for _, id := range []string{idC, idD} {
		if got[id].where != "absent" {
			t.Errorf("%s: uncommitted %s loaded as %s", name, id, got[id].where)
		}
	}
	// With every unsynced write lost, a commit in flight is lost too.
	if v == lostAll && c < len(steps) && strings.HasSuffix(steps[c].name, "commit") {
		for _, id := range []string{idA, idB} {
			if snap(c - 1)[id].where == "absent" && got[id].where != "absent" {
				t.Errorf("%s: %s loaded before its commit synced", name, id)
			}
		}
	}
	// Quarantine holds only what was never acknowledged.
	for _, dir := range []string{crashDir, crashDir + "/dead"} {
		for _, n := range disk.names(dir) {
			i := strings.Index(n, ".broken")
			if i < 0 {
				continue
			}
			id := strings.TrimSuffix(strings.TrimSuffix(n[:i], ".msg"), ".eml")
			if id == idV1Orphan {
				continue
			}
			if snap(floor)[id].where != "absent" {
				t.Errorf("%s: acknowledged %s quarantined as %s", name, id, n)
			}
		}
	}
	// A second start finds nothing to repair and loads the same.
	s2 := openCrash(t, disk)
	envs2, broken2, err := s2.Load()
	if err != nil || broken2 != 0 {
		t.Fatalf("%s: second Load: %d broken, %v", name, broken2, err)
	}
	got2, err := observe(s2, envs2)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, id := range crashIDs() {
		if got2[id] != got[id] {
			t.Errorf("%s: second Load: %s is %v, first was %v", name, id, got2[id], got[id])
		}
	}
	for _, dir := range []string{crashDir, crashDir + "/dead"} {
		for _, n := range disk.names(dir) {
			if strings.HasPrefix(n, ".tmp-") || strings.HasSuffix(n, ".json") || strings.HasSuffix(n, ".eml") {
				t.Errorf("%s: %s left after Load", name, filepath.Join(dir, n))
			}
		}
	}
	// The restarted relay carries on: a new state lands after any torn
	// tail and is the one read back.
	for _, e := range envs2 {
		e.Attempts += 100
		if err := s2.Update(e); err != nil {
			t.Fatalf("%s: Update after restart: %v", name, err)
		}
		back, err := s2.Get(e.ID)
		if err != nil || back.Attempts != e.Attempts {
			t.Errorf("%s: after restart %s updated to %d attempts, read back %v, %v", name, e.ID, e.Attempts, back, err)
		}
	}
}
