package spool

import (
	"errors"
	"hash/crc32"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
)

// v1Files says which files of a v1 entry exist: <id>.json and <id>.eml,
// live and in dead/.
type v1Files struct{ liveJSON, liveEML, deadJSON, deadEML bool }

func (v *v1Files) set(dead, json bool) {
	switch {
	case dead && json:
		v.deadJSON = true
	case dead:
		v.deadEML = true
	case json:
		v.liveJSON = true
	default:
		v.liveEML = true
	}
}

// v1Plan is one v1 entry about to become a .msg file.
type v1Plan struct {
	env  *Envelope
	dir  string // where the .msg goes: the spool or dead/
	body string
	size int64
	crc  uint32
	// old are the v1 files, removed once the .msg is durable.
	old []string
}

// migrate turns every v1 entry into a .msg file. Each is written to a temp
// file, all are synced, renamed into place, synced again, and only then
// are the v1 files removed: a crash at any point leaves the v1 files, or
// both (the .msg wins at the next Load), never neither.
func (l *loader) migrate() error {
	s := l.s
	var plans []*v1Plan
	for _, id := range slices.Sorted(maps.Keys(l.v1)) {
		v := l.v1[id]
		if l.v2[id] {
			// Migrated before a crash took the v1 files' removal.
			for _, p := range l.v1Paths(id, v) {
				s.fs.Remove(p)
			}
			continue
		}
		p, err := l.plan(id, v)
		if err != nil {
			return err
		}
		if p != nil {
			plans = append(plans, p)
		}
	}
	if len(plans) == 0 {
		return nil
	}
	for _, p := range plans {
		if err := s.writeV2(p); err != nil {
			return err
		}
	}
	if err := s.sync.Sync(); err != nil {
		return err
	}
	for _, p := range plans {
		if err := s.fs.Rename(tempPath(p.dir, p.env.ID), filepath.Join(p.dir, p.env.ID+".msg")); err != nil {
			return err
		}
	}
	if err := s.sync.Sync(); err != nil {
		return err
	}
	live := 0
	for _, p := range plans {
		for _, old := range p.old {
			s.fs.Remove(old)
		}
		l.v2[p.env.ID] = true
		if p.dir == s.dir {
			l.envs = append(l.envs, p.env)
			live++
		}
	}
	s.log.Info("migrated v1 spool entries to format v2", "live", live, "dead", len(plans)-live)
	return nil
}

func (l *loader) v1Paths(id string, v *v1Files) []string {
	s := l.s
	var out []string
	for _, f := range []struct {
		ok   bool
		path string
	}{
		{v.liveJSON, filepath.Join(s.dir, id+".json")},
		{v.liveEML, filepath.Join(s.dir, id+".eml")},
		{v.deadJSON, filepath.Join(s.dead, id+".json")},
		{v.deadEML, filepath.Join(s.dead, id+".eml")},
	} {
		if f.ok {
			out = append(out, f.path)
		}
	}
	return out
}

// plan reads a v1 entry the way v1's Load did: while dead/<id>.json exists
// the message is dead (a crash interrupted the move into dead/ or out of
// it) and its body is wherever its .eml is. Entries that cannot be
// migrated are quarantined and plan returns nil.
func (l *loader) plan(id string, v *v1Files) (*v1Plan, error) {
	s := l.s
	p := &v1Plan{old: l.v1Paths(id, v)}
	var envPath string
	switch {
	case v.deadJSON:
		envPath, p.dir = filepath.Join(s.dead, id+".json"), s.dead
		if v.deadEML {
			p.body = filepath.Join(s.dead, id+".eml")
		} else if v.liveEML {
			p.body = filepath.Join(s.dir, id+".eml")
		}
	case v.liveJSON:
		envPath, p.dir = filepath.Join(s.dir, id+".json"), s.dir
		if v.liveEML {
			p.body = filepath.Join(s.dir, id+".eml")
		}
	}
	var err error
	switch {
	case envPath == "":
		// Most likely a crash before the envelope was written, but an
		// envelope lost to damage looks the same, and that message was
		// acknowledged.
		err = corrupt("v1 body without an envelope")
	default:
		p.env, err = s.readV1(envPath, id)
	}
	if err == nil && p.body == "" {
		err = corrupt("v1 body (.eml) is missing")
	}
	if err == nil {
		err = s.checkV1Body(p)
	}
	var ce *corruptError
	if errors.As(err, &ce) {
		l.broken++
		return nil, l.quarantineAll(id, p.old, err)
	}
	if err != nil {
		return nil, err
	}
	if v.deadEML && v.liveEML {
		// Not a state v1 leaves; keep the body not migrated for a human.
		extra := filepath.Join(s.dir, id+".eml")
		if err := l.quarantine(s.dir, id, []string{id + ".eml"}, corrupt("second v1 body; the one in dead/ was migrated")); err != nil {
			return nil, err
		}
		p.old = slices.DeleteFunc(p.old, func(o string) bool { return o == extra })
	}
	return p, nil
}

func (l *loader) quarantineAll(id string, paths []string, reason error) error {
	for _, p := range paths {
		if err := l.quarantine(filepath.Dir(p), id, []string{filepath.Base(p)}, reason); err != nil {
			return err
		}
	}
	return nil
}

// checkV1Body compares the .eml with the envelope's CRC (v1's body_crc,
// hex CRC-32C; envelopes older than it have none).
func (s *Spool) checkV1Body(p *v1Plan) error {
	f, err := s.fs.OpenFile(p.body, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	c := crc32.New(crcTable())
	n, err := io.Copy(c, f)
	if err != nil {
		return err
	}
	p.size, p.crc = n, c.Sum32()
	if p.env.BodyCRC != "" && p.env.BodyCRC != hexCRC(p.crc) {
		return corrupt("v1 body checksum mismatch (%d bytes on disk, %d expected)", n, p.env.Size)
	}
	return nil
}

// writeV2 writes the plan's .msg under its temp name, unsynced: migrate
// syncs all of them at once.
func (s *Spool) writeV2(p *v1Plan) error {
	p.env.Version, p.env.Size, p.env.BodyCRC = FormatVersion, int(p.size), hexCRC(p.crc)
	rec, err := envelopeRecord(p.crc, p.env)
	if err != nil {
		return err
	}
	f, err := s.fs.OpenFile(p.body, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	s.sync.Wrote(p.size)
	return s.writeMsg(tempPath(p.dir, p.env.ID), header{bodyLen: p.size, bodyCRC: p.crc}, f, rec, false)
}
