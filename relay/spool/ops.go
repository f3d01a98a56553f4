package spool

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Update appends env as the message's new state. Nothing is synced: a
// state lost in a crash only repeats an attempt (at-least-once), and the
// next group sync of any commit makes it durable anyway. An error wrapping
// fs.ErrNotExist means the message was dropped or delivered meanwhile.
func (s *Spool) Update(env *Envelope) error {
	if !validID(env.ID) {
		return fs.ErrNotExist
	}
	defer s.locks.lock(env.ID)()
	return s.appendEnvelope(s.live(env.ID), env, false)
}

// appendEnvelope writes env after the last valid record of path, over any
// torn tail, or compacts the file when its records have grown; fsync
// makes the new state durable before it returns.
func (s *Spool) appendEnvelope(path string, env *Envelope, fsync bool) error {
	f, err := s.fs.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := readState(f, env.ID)
	if err != nil {
		return err
	}
	if st.done || st.env == nil {
		return fmt.Errorf("%s: delivered: %w", env.ID, fs.ErrNotExist)
	}
	env.Version, env.Size, env.BodyCRC = FormatVersion, int(st.hdr.bodyLen), hexCRC(st.hdr.bodyCRC)
	rec, err := envelopeRecord(st.last, env)
	if err != nil {
		return err
	}
	if st.recordBytes()+int64(len(rec)) > s.compactAt {
		// The compacted file has this record first: chained to the body.
		if rec, err = envelopeRecord(st.hdr.bodyCRC, env); err != nil {
			return err
		}
		return s.compact(path, env.ID, f, st.hdr, rec)
	}
	if _, err := f.WriteAt(rec, st.end); err != nil {
		s.noteFull(err)
		return err
	}
	if fsync {
		return f.Sync()
	}
	return f.Close()
}

// compact rewrites the file as header, body and one record. The temp file
// is fsynced before the rename, so the new name never points at data that
// a crash could lose; the rename itself is not waited for: undone, it
// leaves the old file, an older state.
func (s *Spool) compact(path, id string, old File, h header, rec []byte) error {
	tmp := tempPath(filepath.Dir(path), id)
	err := s.writeMsg(tmp, h, io.NewSectionReader(old, h.bodyOff, h.bodyLen), rec, true)
	if err == nil {
		err = s.fs.Rename(tmp, path)
	}
	if err != nil {
		s.noteFull(err)
		s.fs.Remove(tmp)
	}
	return err
}

// writeMsg writes a whole .msg file whose body CRC is known already.
func (s *Spool) writeMsg(path string, h header, body io.Reader, rec []byte, fsync bool) error {
	f, err := s.fs.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, fileMode)
	if err != nil {
		return err
	}
	defer f.Close()
	h.bodyOff = headerSize
	bw := bufio.NewWriterSize(f, bufSize)
	if _, err := bw.Write(h.encode()); err != nil {
		return err
	}
	if _, err := io.Copy(bw, body); err != nil {
		return err
	}
	if _, err := bw.Write(rec); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if fsync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	return f.Close()
}

// Remove marks a delivered message done and leaves the unlink, or the
// move into the pool of free files, to the reaper, off the delivery path. The done record is not synced: if a
// crash undoes it the message is sent again, which at-least-once allows;
// it survives kill -9 through the page cache, and Load unlinks done files.
func (s *Spool) Remove(id string) error {
	if !validID(id) {
		return nil
	}
	size, err := s.markDone(id)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	s.reapLater(id, size <= poolMaxBytes)
	return nil
}

// markDone appends the done record and returns the file's size.
func (s *Spool) markDone(id string) (int64, error) {
	defer s.locks.lock(id)()
	f, err := s.fs.OpenFile(s.live(id), os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := readTail(f, id)
	if err != nil {
		return 0, err
	}
	if !st.done {
		if _, err := f.WriteAt(record(st.last, recDone, nil), st.end); err != nil {
			return 0, err
		}
	}
	if _, ok := s.placed.get(id); ok {
		// The file goes back to the pool holding another id than its
		// name, so only its contents say it is free. A placeholder
		// header says so whatever a torn write of its next message
		// leaves of the records behind it: without one, a lost first
		// page and a kept later one could wipe the done record and
		// bring the delivered message back.
		if _, err := f.WriteAt(placeholder(), 0); err != nil {
			return 0, err
		}
	}
	return st.size, f.Close()
}

// Bury moves a message to dead/ with its reason, durably. The record is
// fsynced before the rename, so a file in dead/ always says why; a crash
// before the rename leaves a live file with a reason, which Load buries.
func (s *Spool) Bury(env *Envelope, reason string, now time.Time) error {
	if !validID(env.ID) {
		return fs.ErrNotExist
	}
	env.DeadReason = reason
	t := now.UTC()
	env.DeadAt = &t
	defer s.locks.lock(env.ID)()
	if err := s.appendEnvelope(s.live(env.ID), env, true); err != nil {
		return err
	}
	if err := s.fs.Rename(s.live(env.ID), s.deadPath(env.ID)); err != nil {
		return err
	}
	s.placed.take(env.ID)
	return s.sync.Sync()
}

// Resurrect moves a dead letter back for another round of attempts:
// failed recipients are pending again, delivered ones stay delivered, and
// max_age counts from now. The rename is made durable before the new
// state is written: a crash in between leaves a live file that still says
// dead, which Load buries again, so the message is never lost, nor live
// and dead at once.
func (s *Spool) Resurrect(id string, now time.Time) (*Envelope, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	defer s.locks.lock(id)()
	st, err := s.readFile(s.deadPath(id), id)
	if errors.Is(err, fs.ErrNotExist) && s.hasV1(s.dead, id) {
		return nil, errNotMigrated
	}
	if err != nil {
		return nil, err
	}
	env := st.env
	for _, f := range env.Failures {
		// Once per recipient: to the first route state of the failure's
		// route, or to a new one when a reload has since renamed that state
		// (delivery then takes a route that no longer exists to the
		// default, as it does for any other message).
		i := slices.IndexFunc(env.Routes, func(rs RouteState) bool { return rs.Route == f.Route })
		if i < 0 {
			env.Routes = append(env.Routes, RouteState{Route: f.Route})
			i = len(env.Routes) - 1
		}
		env.Routes[i].Pending = append(env.Routes[i].Pending, f.Rcpts...)
	}
	env.Failures, env.DeadReason, env.DeadAt = nil, "", nil
	env.Attempts, env.NextAttempt, env.LastError, env.UpstreamErrors = 0, now.UTC(), "", nil
	env.ReceivedAt = now.UTC()
	if err := s.fs.Rename(s.deadPath(id), s.live(id)); err != nil {
		return nil, err
	}
	err = s.sync.Sync()
	if err == nil {
		err = s.appendEnvelope(s.live(id), env, false)
	}
	if err == nil {
		err = s.sync.Sync()
	}
	if err != nil {
		// Back to dead/ while the file still says dead; if this fails too,
		// Load does it.
		if st2, rerr := s.readFile(s.live(id), id); rerr == nil && st2.env.DeadReason != "" {
			if rerr := s.fs.Rename(s.live(id), s.deadPath(id)); rerr != nil {
				s.log.Warn("moving a failed retry back to dead/ failed; Load does it", "msg_id", id, "err", rerr)
			}
		}
		return nil, err
	}
	return env, nil
}

// errNotMigrated refuses to change a v1 entry in place; Load migrates it.
var errNotMigrated = errors.New("spool entry is in the v1 format: run relaycar serve once to migrate the spool")

func (s *Spool) hasV1(dir, id string) bool {
	f, err := s.fs.OpenFile(filepath.Join(dir, id+".json"), os.O_RDONLY, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// Drop deletes a message, live or dead (or still in the v1 format), and
// waits until the deletion is durable, so a dropped message does not come
// back after a crash.
func (s *Spool) Drop(id string) error {
	if !validID(id) {
		return fs.ErrNotExist
	}
	defer s.locks.lock(id)()
	found := false
	for _, dir := range []string{s.dir, s.dead} {
		for _, ext := range []string{".msg", ".json", ".eml"} {
			p := filepath.Join(dir, id+ext)
			if dir == s.dir && ext == ".msg" {
				p = s.live(id)
			}
			err := s.fs.Remove(p)
			if err == nil {
				found = true
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	s.placed.take(id)
	if !found {
		return fs.ErrNotExist
	}
	return s.sync.Sync()
}
