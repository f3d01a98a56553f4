package spool

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

// Load recovers the spool at start, before any intake: it removes temp
// files and delivered (done) files, quarantines damaged entries as
// .broken (counted in broken; never delivered, never deleted), finishes
// dead-letterings a crash interrupted, migrates v1 entries, and returns
// the live envelopes oldest first. It fails only on I/O errors: an
// unreadable disk is no evidence that a message is damaged.
func (s *Spool) Load() (envs []*Envelope, broken int, err error) {
	l := &loader{s: s, names: map[string]map[string]bool{}, v2: map[string]bool{}, v1: map[string]*v1Files{}}
	// dead/ first: a dead-lettering finished below moves a file there
	// that was checked already.
	for _, dir := range []string{s.dead, s.dir} {
		if err := l.scan(dir); err != nil {
			return nil, l.broken, err
		}
	}
	if err := l.migrate(); err != nil {
		return nil, l.broken, err
	}
	slices.SortFunc(l.envs, func(a, b *Envelope) int { return strings.Compare(a.ID, b.ID) })
	if s.maxBytes > 0 {
		s.measure()
	}
	// Quarantine renames, finished buries and unlinks need not be durable
	// (Load redoes them), but one sync here is cheap and settles them.
	return l.envs, l.broken, s.sync.Sync()
}

type loader struct {
	s      *Spool
	envs   []*Envelope
	broken int
	// names is each directory's listing, to pick free .broken names.
	names map[string]map[string]bool
	// v2 holds the ids with a valid .msg file, live or dead.
	v2 map[string]bool
	v1 map[string]*v1Files
}

func (l *loader) scan(dir string) error {
	s := l.s
	entries, err := s.fs.ReadDir(dir)
	if err != nil {
		return err
	}
	names := map[string]bool{}
	for _, e := range entries {
		names[e.Name()] = true
	}
	l.names[dir] = names
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir():
		case strings.HasPrefix(name, atomicfile.TempPrefix):
			// v1 writes, compactions and migrations a crash interrupted.
			s.fs.Remove(filepath.Join(dir, name))
		case strings.HasPrefix(name, freePrefix) && dir == s.dir:
			if err := l.loadFree(strings.TrimPrefix(name, freePrefix)); err != nil {
				return err
			}
		case strings.HasPrefix(name, "."):
			// .lock
		case strings.HasSuffix(name, ".msg"):
			if err := l.loadMsg(dir, strings.TrimSuffix(name, ".msg")); err != nil {
				return err
			}
		case strings.HasSuffix(name, ".json"), strings.HasSuffix(name, ".eml"):
			ext := filepath.Ext(name)
			id := strings.TrimSuffix(name, ext)
			v := l.v1[id]
			if v == nil {
				v = &v1Files{}
				l.v1[id] = v
			}
			v.set(dir == s.dead, ext == ".json")
		}
	}
	return nil
}

func (l *loader) loadMsg(dir, id string) error {
	s := l.s
	path := filepath.Join(dir, id+".msg")
	f, err := s.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	st, err := readState(f, id)
	if err == nil {
		switch {
		case st.done:
			f.Close()
			if err := s.fs.Remove(path); err != nil {
				s.log.Warn("unlinking delivered message failed", "msg_id", id, "err", err)
			}
			return nil
		case st.env == nil && st.foreign:
			// Taken from the pool under its own name by an earlier
			// release, never committed: the records are the previous
			// message's.
			err = corrupt("a reused file never committed (intake interrupted; not acknowledged)")
		case st.env == nil:
			err = corrupt("no valid envelope record")
		default:
			err = checkBody(f, st.hdr)
		}
	}
	f.Close()
	var ce *corruptError
	switch {
	case errors.Is(err, errNewer):
		s.log.Error("leaving alone a spool file of a newer relaycar", "msg_id", id, "err", err)
		return nil
	case errors.As(err, &ce):
		l.broken++
		return l.quarantine(dir, id, []string{id + ".msg"}, err)
	case err != nil:
		return fmt.Errorf("reading spool entry %s: %w", id, err)
	}
	l.v2[id] = true
	if dir == s.dead {
		return nil
	}
	if st.env.DeadReason != "" {
		// A dead-lettering, or the first half of a retry, that a crash
		// interrupted: dead until a retry completes.
		s.log.Info("finishing an interrupted dead-lettering", "msg_id", id)
		return s.fs.Rename(path, s.deadPath(id))
	}
	l.envs = append(l.envs, st.env)
	return nil
}

// loadFree sorts out a free file. Usually it holds a delivered message
// (the one it was kept from, or one placed in it since) or a new message
// torn mid-write, never acknowledged: either is the pool's. A message a
// commit left in it (Spool.placed) that a crash or kill kept from
// being delivered or named at Close is live: it gets its name and loads
// as any other. One whose header and envelope are there but whose body
// is not may have been acknowledged: quarantined under its id.
func (l *loader) loadFree(free string) error {
	s := l.s
	if !validID(free) {
		s.adopt(free) // unlinks it
		return nil
	}
	path := s.freePath(free)
	f, err := s.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	st, err := readState(f, "")
	id := ""
	if err == nil && st.placedIn(free) {
		id = st.env.ID
		err = checkBody(f, st.hdr)
	}
	f.Close()
	var ce *corruptError
	switch {
	case errors.Is(err, errNewer):
		s.log.Error("leaving alone a spool file of a newer relaycar", "file", path, "err", err)
		return nil
	case id == "" && (err == nil || errors.As(err, &ce)):
		s.adopt(free)
		return nil
	case errors.As(err, &ce):
		// Another id's header and envelope, a torn body: quarantined below.
	case err != nil:
		return fmt.Errorf("reading spool entry %s: %w", freePrefix+free, err)
	default:
		err = s.renameNoReplace(path, s.live(id))
		switch {
		case err == nil:
			s.log.Info("named a message left in a pool file by a stop without shutdown", "msg_id", id, "file", freePrefix+free)
			return l.loadMsg(s.dir, id)
		case errors.Is(err, fs.ErrExist):
			err = corrupt("a second copy of %s, committed in place", id)
		default:
			return err
		}
	}
	l.broken++
	b := l.brokenName(s.dir, id+".msg")
	if rerr := s.fs.Rename(path, filepath.Join(s.dir, b)); rerr != nil {
		return rerr
	}
	s.log.Warn("quarantining unreadable spool entry", "msg_id", id, "dir", s.dir, "files", []string{b}, "reason", err)
	return nil
}

// brokenName picks <name>.broken in dir, never an earlier one's name.
func (l *loader) brokenName(dir, name string) string {
	names := l.names[dir]
	b := name + ".broken"
	for i := 2; names[b]; i++ {
		b = fmt.Sprintf("%s.broken.%d", name, i)
	}
	names[b] = true
	return b
}

// quarantine renames files of dir to <name>.broken for a human, never
// over an earlier one.
func (l *loader) quarantine(dir, id string, files []string, reason error) error {
	var to []string
	for _, name := range files {
		b := l.brokenName(dir, name)
		if err := l.s.fs.Rename(filepath.Join(dir, name), filepath.Join(dir, b)); err != nil {
			return err
		}
		to = append(to, b)
	}
	l.s.log.Warn("quarantining unreadable spool entry", "msg_id", id, "dir", dir, "files", to, "reason", reason)
	return nil
}
