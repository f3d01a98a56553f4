package spool

import (
	"bufio"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
)

// Writer streams one new message into the spool: Create, Write the body,
// then Commit or Abort. It is not safe for concurrent use.
type Writer struct {
	s  *Spool
	id string
	// path is the file being written: <id>.msg, or .free-<free>, which
	// the message keeps once committed (Spool.placed).
	path string
	free string
	// claimed: the message is in Spool.placed (Writer.claim).
	claimed bool
	// durable: an in-place commit's fdatasync succeeded (Abort then
	// syncs its unlink).
	durable bool
	f       File
	bw      *bufio.Writer
	crc     hash.Hash32
	n       int64
	err     error
	// over: committed or aborted; the file is no longer the Writer's.
	over bool
	// held is what this message counts against MaxBytes while it is
	// written (Spool.inflight), before its commit counts it as used.
	held int64
}

var errWriterDone = errors.New("spool: writer already committed or aborted")

// Create starts a message in a free file from the pool, or in a new one
// under its final name (one O_EXCL create). Never a temp file and a
// rename: every create, rename and unlink takes the directory lock, and
// under load that lock, not the disk, is the limit.
func (s *Spool) Create(id string) (*Writer, error) {
	if !validID(id) {
		return nil, fmt.Errorf("spool: invalid message id %q", id)
	}
	s.writing.Add(1)
	f, path, free, err := s.open(id)
	if err != nil {
		s.writing.Add(-1)
		s.noteFull(err)
		return nil, err
	}
	bw, _ := s.writers.Get().(*bufio.Writer)
	if bw == nil {
		bw = bufio.NewWriterSize(f, bufSize)
	} else {
		bw.Reset(f)
	}
	w := &Writer{s: s, id: id, path: path, free: free, f: f, bw: bw, crc: crc32.New(crcTable())}
	w.bw.Write(placeholder())
	return w, nil
}

// open picks the file for message id: a free file from the pool, written
// over in place under its free name (commitInPlace), or a new <id>.msg.
func (s *Spool) open(id string) (f File, path, free string, err error) {
	if f, free = s.reuse(); f != nil {
		return f, s.freePath(free), free, nil
	}
	path = s.live(id)
	f, err = s.fs.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, fileMode)
	return f, path, "", err
}

// Write appends body bytes: the message exactly as it will be delivered.
// After an error the Writer only accepts Abort (or a failing Commit).
func (w *Writer) Write(p []byte) (int, error) {
	if w.over {
		return 0, errWriterDone
	}
	if w.err != nil {
		return 0, w.err
	}
	if err := w.hold(int64(len(p))); err != nil {
		w.err = err
		return 0, err
	}
	n, err := w.bw.Write(p)
	w.crc.Write(p[:n])
	w.n += int64(n)
	if err != nil {
		w.err = err
		w.s.noteFull(err)
	}
	return n, err
}

// Commit writes env as the first record, then the header that makes the
// file valid, and returns once all of it is durable: the caller answers
// 250 only after a nil return. Concurrent commits share one syncfs. It
// sets env.Size, env.BodyCRC and env.Version. On error nothing is kept.
func (w *Writer) Commit(env *Envelope) error {
	if w.over {
		return errWriterDone
	}
	err := w.commit(env)
	if err != nil {
		w.s.noteFull(err)
		w.Abort()
		return err
	}
	w.over = true
	w.s.writing.Add(-1)
	w.release()
	w.s.full.Store(nil)
	if w.s.maxBytes > 0 {
		// Its records take a few hundred bytes; the next walk has the
		// exact figure.
		w.s.counted(headerSize + w.n + 4096)
		w.unhold()
	}
	return nil
}

// release hands the buffer back for the next intake.
func (w *Writer) release() {
	if w.bw != nil {
		w.bw.Reset(nil)
		w.s.writers.Put(w.bw)
		w.bw = nil
	}
}

func (w *Writer) commit(env *Envelope) error {
	if w.err != nil {
		return w.err
	}
	if env.ID != w.id {
		return fmt.Errorf("spool: envelope id %q committed as %q", env.ID, w.id)
	}
	sum := w.crc.Sum32()
	env.Version, env.Size, env.BodyCRC = FormatVersion, int(w.n), hexCRC(sum)
	rec, err := envelopeRecord(sum, env)
	if err != nil {
		return err
	}
	if _, err := w.bw.Write(rec); err != nil {
		return err
	}
	if err := w.bw.Flush(); err != nil {
		return err
	}
	if w.free != "" {
		if err := w.claim(); err != nil {
			return err
		}
	}
	// The header goes last: until it is on disk, the file cannot pass for
	// a committed message, whatever else of it survives a crash.
	h := header{bodyOff: headerSize, bodyLen: w.n, bodyCRC: sum}
	if _, err := w.f.WriteAt(h.encode(), 0); err != nil {
		return err
	}
	if w.free != "" {
		// Alone: no other message is being written, so none will commit
		// soon enough to share a sync with this one.
		return w.commitInPlace(w.s.writing.Load() == 1)
	}
	// Closed before the wait: a descriptor per waiting session adds up,
	// and syncfs covers closed files.
	err = w.f.Close()
	w.f = nil
	if err != nil {
		return err
	}
	w.s.sync.Wrote(w.n)
	return w.s.sync.Sync()
}

// commitInPlace finishes a message written over a free file. Its free
// name is durable already (a free file is ready only after two syncs),
// so alone it needs only its data made durable: fdatasync, with no
// journal commit when the message fits in the blocks the file has (on a
// journaled ext4, 1.37 times the one-session accept rate of a syncfs
// commit). It then stays under the free name until it is delivered
// (placed): no rename, whose cost the file's next sync would pay. Load
// finds a committed message under a free name by its contents
// (loader.loadFree). With others being written it joins their shared
// syncfs, which covers the file as it covers theirs: one sync for
// many beats a device flush per file.
func (w *Writer) commitInPlace(alone bool) error {
	var err error
	if alone {
		// A sync that failed may have lost what it covered; the spool
		// refuses commits after it, lone ones too.
		if err = w.s.sync.Err(); err == nil {
			err = datasync(w.f)
			w.durable = err == nil
		}
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	w.f = nil
	if err == nil && !alone {
		w.s.sync.Wrote(w.n)
		err = w.s.sync.Sync()
	}
	return err
}

// claim records the message as placed in its pool file before its
// header is written, failing with fs.ErrExist when the id is queued
// already. Written in place, the message takes no name that O_EXCL or
// RENAME_NOREPLACE would refuse when in use: ids are unique, the check
// keeps a bug from queueing one twice. From here on a second Create of
// the id fails at its O_EXCL (Spool.live leads it to this file), and a
// refused commit leaves no complete message behind.
func (w *Writer) claim() error {
	s := w.s
	own := s.ownPath(w.id)
	if !s.placed.claim(w.id, w.free) {
		return &os.PathError{Op: "commit", Path: own, Err: fs.ErrExist}
	}
	f, err := s.fs.OpenFile(own, os.O_RDONLY, 0)
	switch {
	case err == nil:
		f.Close()
		err = &os.PathError{Op: "commit", Path: own, Err: fs.ErrExist}
	case errors.Is(err, fs.ErrNotExist):
		w.claimed = true
		return nil
	}
	s.placed.take(w.id)
	return err
}

// renameNoReplace is RENAME_NOREPLACE, or where the file system cannot
// do it a check that to does not exist and a rename: ids are unique, the
// check only keeps a bug from replacing a queued message. Only Load and
// Close rename a message, so the fallback's window does not matter.
func (s *Spool) renameNoReplace(from, to string) error {
	if err := s.fs.RenameNoReplace(from, to); !errors.Is(err, errors.ErrUnsupported) {
		return err
	}
	f, err := s.fs.OpenFile(to, os.O_RDONLY, 0)
	switch {
	case err == nil:
		f.Close()
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: fs.ErrExist}
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return s.fs.Rename(from, to)
}

// Abort discards the message (552, client gone, a full disk mid-stream).
// It is a no-op after a successful Commit, so callers may defer it.
func (w *Writer) Abort() {
	if w.over {
		return
	}
	w.over = true
	w.s.writing.Add(-1)
	w.release()
	if w.f != nil {
		w.f.Close()
	}
	w.s.fs.Remove(w.path)
	if w.claimed {
		w.s.placed.take(w.id)
	}
	if w.durable {
		// Its fdatasync made it a complete message under a free name,
		// which Load would deliver: the unlink must be durable too.
		w.s.sync.Sync()
	}
	w.unhold()
}

// hold counts n more bytes of this message against MaxBytes, or fails
// with ErrFull: the check at MAIL cannot see how big the messages that
// passed it together will be, this one sees every byte as it comes.
func (w *Writer) hold(n int64) error {
	s := w.s
	if s.maxBytes <= 0 {
		return nil
	}
	if s.usage()+s.inflight.Add(n) > s.maxBytes-s.maxBytes/20 {
		s.inflight.Add(-n)
		return fmt.Errorf("%w: spool.max_bytes %d reached while the message arrived", ErrFull, s.maxBytes)
	}
	w.held += n
	return nil
}

func (w *Writer) unhold() {
	w.s.inflight.Add(-w.held)
	w.held = 0
}

// Body is a message's bytes in the spool, for streaming to an upstream
// without holding them in memory.
type Body struct {
	*io.SectionReader
	f File
}

// Close releases the file.
func (b *Body) Close() error { return b.f.Close() }

// OpenBody opens a live message's body. A compaction or dead-lettering
// meanwhile does not disturb it: the open file keeps its bytes. Remove
// does: a small file goes to the pool and is written over, so only the
// delivery that removes a message may hold its body (as serve's workers
// and drain do).
func (s *Spool) OpenBody(id string) (*Body, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	f, err := s.fs.OpenFile(s.live(id), os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	h, _, err := readHeader(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Body{SectionReader: io.NewSectionReader(f, h.bodyOff, h.bodyLen), f: f}, nil
}
