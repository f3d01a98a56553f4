package relay

import (
	"bytes"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

// Spool is the durable queue on disk:
//
//	<dir>/<id>.eml          message bytes, written once
//	<dir>/<id>.json         Envelope: the commit record, rewritten per attempt
//	<dir>/dead/<id>.{eml,json}  dead letters, with DeadReason
//	<dir>/.tmp-*            in-progress writes, removed at start
//	<dir>/<id>.json.broken  unreadable envelopes, kept for a human
//	<dir>/<id>.eml.broken   their bodies, and bodies found without an envelope
//
// A message exists once its .json is renamed into place and the directory
// is fsynced; until then nothing was promised to the client.
type Spool struct {
	dir  string
	dead string
	fs   atomicfile.FS
	log  *slog.Logger
	sync *atomicfile.GroupSync
	lock *os.File
	// statfs reports the spool's free space; tests fake a full disk with it.
	statfs func(dir string) (space, error)
	// fullAt is the free space seen when a commit last failed with ENOSPC,
	// nil once one succeeds: Ready refuses until space has been freed
	// since, even if statfs shows enough (concurrent commits, metadata, a
	// volume too small for the size limit).
	fullAt atomic.Pointer[uint64]
}

// space is the part of statfs(2) that readiness looks at.
type space struct {
	Avail, Total     uint64 // bytes available to unprivileged writers, and in all
	FreeFiles, Files uint64 // inodes; Files is 0 where the file system has no fixed count
}

func statSpace(dir string) (space, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return space{}, err
	}
	// Bsize equals the fragment size that counts blocks on the file
	// systems a spool lives on (ext4, xfs, tmpfs, overlay).
	bs := uint64(st.Bsize)
	return space{Avail: st.Bavail * bs, Total: st.Blocks * bs, FreeFiles: st.Ffree, Files: st.Files}, nil
}

const (
	fileMode = 0o600
	dirMode  = 0o700
)

// OpenSpool creates the directories if needed. Call Lock to own it as the
// serving process.
func OpenSpool(dir string, log *slog.Logger) (*Spool, error) {
	s := &Spool{dir: dir, dead: filepath.Join(dir, "dead"), fs: atomicfile.OS{}, log: log, statfs: statSpace}
	s.sync = &atomicfile.GroupSync{Dir: dir}
	for _, d := range []string{dir, s.dead} {
		if err := os.MkdirAll(d, dirMode); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// ErrLocked means another relaycar serves this spool.
var ErrLocked = errors.New("spool is in use by a running relaycar")

// Lock takes the spool's exclusive lock for the life of the process, so two
// relays never deliver the same files, and `relaycar queue` knows to go
// through the admin API instead of the files.
func (s *Spool) Lock() error {
	f, err := os.OpenFile(filepath.Join(s.dir, ".lock"), os.O_CREATE|os.O_RDWR, fileMode)
	if err != nil {
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return ErrLocked
		}
		return err
	}
	s.lock = f
	return nil
}

// Locked reports whether another process holds the spool lock.
func (s *Spool) Locked() bool {
	if s.lock != nil {
		return false
	}
	if err := s.Lock(); err != nil {
		return errors.Is(err, ErrLocked)
	}
	s.Unlock()
	return false
}

// Unlock releases the lock taken by Lock.
func (s *Spool) Unlock() {
	if s.lock != nil {
		s.lock.Close()
		s.lock = nil
	}
}

// SyncFor returns the spool's group syncer when dir is on the spool's file
// system (one syncfs then covers both), else a syncer of its own.
func (s *Spool) SyncFor(dir string) *atomicfile.GroupSync {
	if sameDevice(dir, s.dir) {
		return s.sync
	}
	return &atomicfile.GroupSync{Dir: dir}
}

func sameDevice(a, b string) bool {
	var sa, sb syscall.Stat_t
	if syscall.Stat(a, &sa) != nil || syscall.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev
}

// Dir is the spool directory.
func (s *Spool) Dir() string { return s.dir }

// NewID returns a time-sortable id: `ls` and `queue ls` list oldest first.
// It uses only [0-9a-z], so it never collides with ".tmp-" names.
func NewID(now time.Time) string {
	var b [8]byte
	rand.Read(b[:])
	r := strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
	return fmt.Sprintf("%013s%s", strconv.FormatInt(now.UnixMicro(), 36), r[:10])
}

func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func (s *Spool) path(id, ext string) string { return filepath.Join(s.dir, id+ext) }

// Put stores a new message durably and returns only when it is on stable
// storage. This is group commit: concurrent callers write their two files
// without fsync, then share one syncfs(2) of the spool's file system per
// batch, so 32 sessions cost a handful of syncs, not 96 fsyncs. The files
// are created under their final names (O_EXCL) rather than renamed from
// temp files: every create, rename and unlink takes the directory lock,
// and under load that lock, not the disk, was the limit. A crash before
// the sync can leave a torn .json (unparseable) or .eml (CRC mismatch);
// neither was acknowledged, and Load quarantines both. On error nothing is
// kept; a failure for lack of space is remembered for Ready.
func (s *Spool) Put(env *Envelope, data []byte) error {
	err := s.put(env, data)
	switch {
	case err == nil:
		s.fullAt.Store(nil)
	case errors.Is(err, syscall.ENOSPC):
		var free uint64 // unknown: any free space counts as freed
		if sp, serr := s.statfs(s.dir); serr == nil {
			free = sp.Avail
		}
		s.fullAt.Store(&free)
	}
	return err
}

func (s *Spool) put(env *Envelope, data []byte) error {
	env.BodyCRC = bodyCRC(data)
	js, err := encodeEnvelope(env)
	if err != nil {
		return err
	}
	eml, jsn := s.path(env.ID, ".eml"), s.path(env.ID, ".json")
	// Body first: a .json always has its .eml. An .eml alone is most
	// likely a leftover of a crash before the commit, but it may be an
	// acknowledged message whose .json was lost, so Load quarantines it.
	if err := s.create(eml, data); err != nil {
		return err
	}
	if err := s.create(jsn, js); err != nil {
		os.Remove(eml)
		return err
	}
	if err := s.sync.Sync(); err != nil {
		os.Remove(jsn)
		os.Remove(eml)
		return err
	}
	return nil
}

// create writes a new file without fsync; Put's group sync makes it
// durable.
func (s *Spool) create(path string, data []byte) error {
	f, err := s.fs.Create(path, fileMode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// bodyCRC is CRC-32C (hardware-accelerated) of the body, as hex.
func bodyCRC(b []byte) string {
	return fmt.Sprintf("%08x", crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
}

// ReadData returns the message bytes.
func (s *Spool) ReadData(id string) ([]byte, error) { return os.ReadFile(s.path(id, ".eml")) }

// Update rewrites the envelope atomically. The directory is not fsynced: if
// the rename is lost in a crash the previous state comes back, which at
// worst repeats an attempt (at-least-once).
func (s *Spool) Update(env *Envelope) error {
	if _, err := os.Stat(s.path(env.ID, ".eml")); err != nil {
		// Dropped by an operator meanwhile: do not resurrect an envelope
		// without its body.
		return err
	}
	js, err := encodeEnvelope(env)
	if err != nil {
		return err
	}
	tmp, err := atomicfile.WriteTemp(s.fs, s.dir, bytes.NewReader(js), fileMode)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path(env.ID, ".json")); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// Remove deletes a delivered message: envelope first, so a crash in between
// leaves only an orphan body, which Load quarantines (it cannot tell it
// from a message whose envelope was lost). It does not wait for the
// unlink to be durable: if a crash undoes it, the message is sent again,
// which at-least-once allows, and accepts keep the sync bandwidth.
func (s *Spool) Remove(id string) error {
	if err := os.Remove(s.path(id, ".json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.Remove(s.path(id, ".eml")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Bury moves a message to dead/ with its reason. The dead envelope is
// written first; Load finishes a move that a crash interrupted.
func (s *Spool) Bury(env *Envelope, reason string, now time.Time) error {
	env.DeadReason = reason
	t := now.UTC()
	env.DeadAt = &t
	js, err := encodeEnvelope(env)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(s.fs, filepath.Join(s.dead, env.ID+".json"), bytes.NewReader(js), fileMode); err != nil {
		return err
	}
	return s.finishBury(env.ID)
}

func (s *Spool) finishBury(id string) error {
	deadEml := filepath.Join(s.dead, id+".eml")
	err := os.Rename(s.path(id, ".eml"), deadEml)
	if errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Stat(deadEml); errors.Is(serr, fs.ErrNotExist) {
			// An operator dropped the message while it was being buried:
			// do not leave a dead envelope without its body.
			os.Remove(filepath.Join(s.dead, id+".json"))
			os.Remove(s.path(id, ".json"))
			return fs.ErrNotExist
		}
	} else if err != nil {
		return err
	}
	if err := atomicfile.SyncDir(s.dead); err != nil {
		return err
	}
	if err := os.Remove(s.path(id, ".json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return s.sync.Sync()
}

// Load recovers the spool after a start: it removes temp files, completes
// interrupted dead-letter moves, quarantines unreadable envelopes and
// bodies without one as .broken (counted in broken), and returns the live
// envelopes oldest first.
func (s *Spool) Load() (envs []*Envelope, broken int, err error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, 0, err
	}
	have := map[string]bool{}
	for _, e := range entries {
		have[e.Name()] = true
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir():
		case strings.HasPrefix(name, atomicfile.TempPrefix):
			os.Remove(filepath.Join(s.dir, name))
		case strings.HasSuffix(name, ".eml"):
			id := strings.TrimSuffix(name, ".eml")
			if have[id+".json"] {
				continue
			}
			if _, err := os.Stat(filepath.Join(s.dead, id+".json")); err == nil {
				// A dead-letter retry that did not complete: back to dead/.
				if err := os.Rename(filepath.Join(s.dir, name), filepath.Join(s.dead, name)); err != nil {
					return nil, broken, err
				}
				continue
			}
			// Usually a crash between body and envelope (never
			// acknowledged), but an envelope lost to corruption looks the
			// same, and that message was: keep it for a human.
			broken++
			s.log.Warn("quarantining body without envelope", "msg_id", id, "files", name+".broken")
			if err := os.Rename(filepath.Join(s.dir, name), filepath.Join(s.dir, name+".broken")); err != nil {
				return nil, broken, err
			}
		case strings.HasSuffix(name, ".json"):
			id := strings.TrimSuffix(name, ".json")
			if _, err := os.Stat(filepath.Join(s.dead, id+".json")); err == nil {
				if err := s.finishBury(id); err != nil && !errors.Is(err, fs.ErrNotExist) {
					return nil, broken, err
				}
				continue
			}
			env, err := s.readEnvelope(filepath.Join(s.dir, name))
			if err == nil {
				err = s.checkBody(env)
			}
			var corrupt *corruptError
			switch {
			case err == nil:
				envs = append(envs, env)
			case errors.As(err, &corrupt):
				// Torn by a crash before its commit (never acknowledged) or
				// damaged on disk: set aside, body and all, for a human.
				broken++
				s.log.Warn("quarantining unreadable spool entry", "msg_id", id, "files", id+".{json,eml}.broken", "reason", err)
				for _, ext := range []string{".json", ".eml"} {
					if rerr := os.Rename(s.path(id, ext), s.path(id, ext+".broken")); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
						return nil, broken, rerr
					}
				}
			default:
				// An I/O error is not evidence of corruption: refuse to start
				// rather than mislabel an acknowledged message.
				return nil, broken, fmt.Errorf("reading spool entry %s: %w", id, err)
			}
		}
	}
	slices.SortFunc(envs, func(a, b *Envelope) int { return strings.Compare(a.ID, b.ID) })
	return envs, broken, s.sync.Sync()
}

// corruptError marks a spool entry whose contents are wrong, as opposed
// to one that could not be read.
type corruptError struct{ msg string }

func (e *corruptError) Error() string { return e.msg }

// checkBody finds bodies torn by a crash before their commit sync: such a
// message was never acknowledged, but it goes to .broken for a human
// rather than being deleted.
func (s *Spool) checkBody(env *Envelope) error {
	b, err := os.ReadFile(s.path(env.ID, ".eml"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &corruptError{"body (.eml) is missing"}
	case err != nil:
		return err
	case env.BodyCRC != "" && bodyCRC(b) != env.BodyCRC:
		return &corruptError{fmt.Sprintf("body checksum mismatch (%d bytes on disk, %d expected)", len(b), env.Size)}
	}
	return nil
}

func (s *Spool) readEnvelope(path string) (*Envelope, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var env Envelope
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, &corruptError{"envelope: " + err.Error()}
	}
	if env.ID == "" || !validID(env.ID) || filepath.Base(path) != env.ID+".json" {
		return nil, &corruptError{fmt.Sprintf("envelope id %q does not match the file name", env.ID)}
	}
	return &env, nil
}

// List returns the live envelopes without touching anything, for
// read-only tools (`relaycar queue ls` beside a running relay).
func (s *Spool) List() ([]*Envelope, error) { return s.list(s.dir) }

// Dead returns the dead-lettered envelopes, oldest first.
func (s *Spool) Dead() ([]*Envelope, error) { return s.list(s.dead) }

func (s *Spool) list(dir string) ([]*Envelope, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var envs []*Envelope
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		env, err := s.readEnvelope(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // moved or removed meanwhile, or broken: Load handles those
		}
		envs = append(envs, env)
	}
	slices.SortFunc(envs, func(a, b *Envelope) int { return strings.Compare(a.ID, b.ID) })
	return envs, nil
}

// CountDead returns the number of dead letters: exactly what Dead lists,
// so the gauge never counts files nobody can find through /api/dead.
func (s *Spool) CountDead() int {
	envs, _ := s.Dead()
	return len(envs)
}

// Get reads one live envelope.
func (s *Spool) Get(id string) (*Envelope, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	return s.readEnvelope(s.path(id, ".json"))
}

// Resurrect moves a dead letter back into the live spool for another round
// of attempts: failed recipients become pending again, delivered ones stay
// delivered.
func (s *Spool) Resurrect(id string, now time.Time) (*Envelope, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	env, err := s.readEnvelope(filepath.Join(s.dead, id+".json"))
	if err != nil {
		return nil, err
	}
	for _, f := range env.Failures {
		for i := range env.Routes {
			if env.Routes[i].Route == f.Route {
				env.Routes[i].Pending = append(env.Routes[i].Pending, f.Rcpts...)
			}
		}
	}
	env.Failures, env.DeadReason, env.DeadAt = nil, "", nil
	env.Attempts, env.NextAttempt, env.LastError = 0, now.UTC(), ""
	env.UpstreamErrors = nil
	// Counting max_age from now gives the retried message a full window.
	env.ReceivedAt = now.UTC()
	// Live envelope first, body second, dead envelope last. Until the dead
	// envelope is gone, Load treats the message as dead (it finishes an
	// interrupted move into dead/), so a crash or a full disk at any step
	// leaves the message dead, never lost.
	js, _ := encodeEnvelope(env)
	if err := atomicfile.WriteFile(s.fs, s.path(id, ".json"), bytes.NewReader(js), fileMode); err != nil {
		return nil, err
	}
	if err := os.Rename(filepath.Join(s.dead, id+".eml"), s.path(id, ".eml")); err != nil {
		os.Remove(s.path(id, ".json"))
		return nil, err
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return nil, err
	}
	if err := os.Remove(filepath.Join(s.dead, id+".json")); err != nil {
		return nil, err
	}
	return env, atomicfile.SyncDir(s.dead)
}

// Drop deletes a message, live or dead.
func (s *Spool) Drop(id string) error {
	if !validID(id) {
		return fs.ErrNotExist
	}
	found := false
	for _, dir := range []string{s.dir, s.dead} {
		for _, ext := range []string{".json", ".eml"} {
			err := os.Remove(filepath.Join(dir, id+ext))
			if err == nil {
				found = true
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	if !found {
		return fs.ErrNotExist
	}
	atomicfile.SyncDir(s.dead)
	return s.sync.Sync()
}

// errSpoolFull means the spool's file system has no room for a message.
var errSpoolFull = errors.New("spool file system full")

// Envelope, Received header and file-system metadata on top of the body.
const commitOverhead = 64 << 10

// Ready reports whether a message of need bytes can be committed now, for
// /readyz: no sync has failed (sticky), a file can be created, and the file
// system has room for such a message and an inode for each file — and, if
// a commit failed for lack of space, space has been freed since. The room
// asked for is at most a tenth of the file system, so a volume smaller
// than ten maximum-size messages still serves the smaller ones; the ENOSPC
// record catches it when those fill it too.
func (s *Spool) Ready(need int64) error {
	if err := s.sync.Err(); err != nil {
		return err
	}
	f, err := os.CreateTemp(s.dir, atomicfile.TempPrefix+"probe-*")
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: %w", errSpoolFull, err)
	} else if err != nil {
		return err
	}
	name := f.Name()
	f.Close()
	if err := os.Remove(name); err != nil {
		return err
	}
	sp, err := s.statfs(s.dir)
	if err != nil {
		return err
	}
	want := uint64(max(need, 0)) + commitOverhead
	if sp.Total > 0 {
		want = min(want, sp.Total/10)
	}
	if sp.Avail < want {
		return fmt.Errorf("%w: %d bytes free, %d needed", errSpoolFull, sp.Avail, want)
	}
	if sp.Files > 0 && sp.FreeFiles < 3 { // .eml, .json and a temp file
		return fmt.Errorf("%w: %d inodes free", errSpoolFull, sp.FreeFiles)
	}
	if p := s.fullAt.Load(); p != nil {
		if sp.Avail <= *p {
			return fmt.Errorf("%w: the last commit failed for lack of space and none was freed since (%d bytes free)", errSpoolFull, sp.Avail)
		}
		s.fullAt.CompareAndSwap(p, nil)
	}
	return nil
}
