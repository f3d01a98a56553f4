package spool

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// FormatVersion is the on-disk format this package writes. v1 was the
// .eml + .json pair, which Load migrates.
const FormatVersion = 2

const (
	magic      = "RCSPOOL"
	headerSize = 64
	// Record types.
	recEnvelope = 1
	recDone     = 2
	// recHeader is [u32 length][u32 CRC-32C][u8 type].
	recHeader = 9
	// maxRecord bounds a record's length field, so a torn length cannot
	// make a reader allocate gigabytes.
	maxRecord = 4 << 20
)

// crcTable is CRC-32C (Castagnoli), hardware-accelerated on amd64 and
// arm64; crc32 caches it, so this costs nothing after the first call.
func crcTable() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) }

// header is the fixed start of a .msg file; Commit writes it last, so an
// intact header means the body and first record were written before it.
type header struct {
	bodyOff, bodyLen int64
	bodyCRC          uint32
}

func (h header) bodyEnd() int64 { return h.bodyOff + h.bodyLen }

// encode lays out the header:
//
//	0  7  "RCSPOOL"
//	7  1  format version
//	8  8  body offset, little endian
//	16 8  body length
//	24 4  body CRC-32C
//	28 32 reserved, zero
//	60 4  CRC-32C of bytes 0..59
func (h header) encode() []byte {
	b := make([]byte, headerSize)
	copy(b, magic)
	b[7] = FormatVersion
	binary.LittleEndian.PutUint64(b[8:], uint64(h.bodyOff))
	binary.LittleEndian.PutUint64(b[16:], uint64(h.bodyLen))
	binary.LittleEndian.PutUint32(b[24:], h.bodyCRC)
	binary.LittleEndian.PutUint32(b[60:], crc32c(b[:60]))
	return b
}

// placeholder is the header of a file still being written: magic and
// version, so the file is recognisable, but no valid CRC, so nothing reads
// it as committed.
func placeholder() []byte {
	b := make([]byte, headerSize)
	copy(b, magic)
	b[7] = FormatVersion
	binary.LittleEndian.PutUint64(b[8:], headerSize)
	return b
}

// corruptError marks contents that are wrong, as opposed to a file that
// could not be read: only the former is quarantined.
type corruptError struct{ msg string }

func (e *corruptError) Error() string { return e.msg }

func corrupt(format string, args ...any) error { return &corruptError{fmt.Sprintf(format, args...)} }

// errNewer marks a file written by a newer relaycar: left alone, neither
// delivered nor quarantined, so a rollback does not damage it.
var errNewer = errors.New("written by a newer relaycar")

func parseHeader(b []byte, size int64) (header, error) {
	if len(b) < headerSize || string(b[:7]) != magic {
		return header{}, corrupt("no spool header (%d bytes)", size)
	}
	if b[7] > FormatVersion {
		return header{}, fmt.Errorf("format version %d: %w", b[7], errNewer)
	}
	if binary.LittleEndian.Uint32(b[60:]) != crc32c(b[:60]) {
		if b[7] == FormatVersion && binary.LittleEndian.Uint32(b[60:]) == 0 && binary.LittleEndian.Uint64(b[16:]) == 0 {
			return header{}, corrupt("never committed (intake interrupted; not acknowledged)")
		}
		return header{}, corrupt("header checksum mismatch")
	}
	if b[7] != FormatVersion {
		return header{}, corrupt("unknown format version %d", b[7])
	}
	h := header{
		bodyOff: int64(binary.LittleEndian.Uint64(b[8:])),
		bodyLen: int64(binary.LittleEndian.Uint64(b[16:])),
		bodyCRC: binary.LittleEndian.Uint32(b[24:]),
	}
	if h.bodyOff < headerSize || h.bodyLen < 0 || h.bodyEnd() > size {
		return header{}, corrupt("body [%d,+%d) outside the file (%d bytes)", h.bodyOff, h.bodyLen, size)
	}
	return h, nil
}

func readHeader(f File) (header, int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return header{}, 0, err
	}
	hb := make([]byte, headerSize)
	n, err := f.ReadAt(hb, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return header{}, 0, err
	}
	h, err := parseHeader(hb[:n], fi.Size())
	return h, fi.Size(), err
}

// record frames one record: [u32 length of type+payload][u32 CRC-32C of
// length, type and payload][u8 type][payload].
// record encodes one record after a record whose CRC is prev (the body
// CRC for the first record). Each CRC is seeded with the one before it, a
// chain: a stale record beyond a torn one cannot become valid again when
// a later append happens to end exactly where it starts.
func record(prev uint32, typ byte, payload []byte) []byte {
	b := make([]byte, recHeader+len(payload))
	binary.LittleEndian.PutUint32(b, uint32(1+len(payload)))
	b[8] = typ
	copy(b[recHeader:], payload)
	binary.LittleEndian.PutUint32(b[4:], recordCRC(prev, b[:4], b[8:9], payload))
	return b
}

func recordCRC(prev uint32, length, typ, payload []byte) uint32 {
	c := crc32.Update(prev, crcTable(), length)
	c = crc32.Update(c, crcTable(), typ)
	return crc32.Update(c, crcTable(), payload)
}

func envelopeRecord(prev uint32, env *Envelope) ([]byte, error) {
	js, err := json.Marshal(env)
	if err != nil {
		return nil, err
	}
	if len(js)+1 > maxRecord {
		return nil, fmt.Errorf("envelope of %s is %d bytes, more than a record holds", env.ID, len(js))
	}
	return record(prev, recEnvelope, js), nil
}

// state is what a .msg file says.
type state struct {
	hdr header
	// env is the last valid envelope record, nil if none.
	env  *Envelope
	done bool
	// end is the offset after the last valid record: the next append goes
	// there, over any torn tail, chained to last (the last valid record's
	// CRC, or the body CRC when there is none).
	end  int64
	last uint32
	// size is the file's size; size-end bytes are a torn tail (or, in a
	// reused file, the previous message's).
	size int64
	// foreign: the first valid record is another message's envelope, as
	// in a file taken from the pool whose new message was never committed.
	foreign bool
}

// recordBytes is the space the valid records take; compaction watches it.
func (s *state) recordBytes() int64 { return s.end - s.hdr.bodyEnd() }

// readState parses the header and scans the records of message id, or
// of whoever's the first envelope record is when id is "". Scanning stops at
// the first torn or invalid record: appends are never synced one by one,
// so a bad record can only be an unsynced tail, and the last good one
// before it is the state.
func readState(f File, id string) (*state, error) { return scanState(f, id, true) }

// readTail is readState for an append that needs only where the records
// end (the done record): an envelope record is recognised as id's by its
// "id" key rather than decoded, and st.env stays nil. Decoding was a
// tenth of a delivery's CPU at one session.
func readTail(f File, id string) (*state, error) { return scanState(f, id, false) }

func scanState(f File, id string, decode bool) (*state, error) {
	h, size, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	st := &state{hdr: h, end: h.bodyEnd(), size: size, last: h.bodyCRC}
	// Sized to the records (usually one envelope of a few hundred bytes):
	// this runs for every delivery, and bufio's default is 4 KiB.
	r := bufio.NewReaderSize(io.NewSectionReader(f, st.end, size-st.end), int(min(max(size-st.end, 16), 4096)))
	var key []byte
	if !decode {
		key = idKey(id)
	}
	var rh [recHeader]byte
	for {
		if _, err := io.ReadFull(r, rh[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return st, nil
			}
			return nil, err
		}
		n := int64(binary.LittleEndian.Uint32(rh[:]))
		if n < 1 || n > maxRecord || st.end+recHeader-1+n > size {
			return st, nil
		}
		payload := make([]byte, n-1)
		if _, err := io.ReadFull(r, payload); err != nil {
			return nil, err
		}
		sum := binary.LittleEndian.Uint32(rh[4:])
		if recordCRC(st.last, rh[:4], rh[8:9], payload) != sum {
			return st, nil
		}
		switch rh[8] {
		case recEnvelope:
			// Another message's record can only be stale data from a
			// reused block: the end, like any invalid record.
			if !decode {
				// json.Marshal writes the key once, unspaced; a quote
				// inside a value is escaped, so it cannot fake it.
				if !bytes.Contains(payload, key) {
					return st, nil
				}
				break
			}
			var env Envelope
			err := json.Unmarshal(payload, &env)
			if err == nil && id == "" {
				// A free file: its first envelope says whose it is.
				id = env.ID
			}
			if err != nil || env.ID != id {
				st.foreign = st.env == nil && env.ID != ""
				return st, nil
			}
			st.env = &env
		case recDone:
			st.done = true
		default:
			return st, nil
		}
		st.end += recHeader - 1 + n
		st.last = sum
	}
}

// checkBody reads the whole body and compares it with the header's CRC:
// a crash before the commit sync can leave the header durable but not
// every body page.
func checkBody(f File, h header) error {
	c := crc32.New(crcTable())
	if _, err := io.Copy(c, io.NewSectionReader(f, h.bodyOff, h.bodyLen)); err != nil {
		return err
	}
	if c.Sum32() != h.bodyCRC {
		return corrupt("body checksum mismatch (%08x on disk, %08x in the header)", c.Sum32(), h.bodyCRC)
	}
	return nil
}

// idKey is how an envelope record of id names it.
func idKey(id string) []byte { return []byte(`"id":"` + id + `"`) }

func hexCRC(c uint32) string { return fmt.Sprintf("%08x", c) }

func crc32c(b []byte) uint32 { return crc32.Checksum(b, crcTable()) }
