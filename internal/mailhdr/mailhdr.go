// Package mailhdr finds the header section of a message the way the relay
// defines it, so that every component agrees where the header ends.
package mailhdr

import "bytes"

// Split finds the header section the way Postfix's cleanup does: it ends
// at the blank line, or at the first line that is neither a "Name: value"
// field nor a continuation (that line then starts the body). An mbox
// "From " separator line at the very start is dropped. Lines end in CRLF.
// It returns the header bytes (complete lines) and the offset where the
// body starts.
func Split(raw []byte) (hdr []byte, bodyOffset int) {
	start := 0
	if bytes.HasPrefix(raw, []byte("From ")) {
		if i := bytes.Index(raw, []byte("\r\n")); i >= 0 {
			start = i + 2
		}
	}
	pos := start
	for pos < len(raw) {
		end := bytes.Index(raw[pos:], []byte("\r\n"))
		next := pos + end + 2
		if end < 0 {
			end, next = len(raw)-pos, len(raw)
		}
		line := raw[pos : pos+end]
		switch {
		case len(line) == 0:
			return raw[start:pos], next
		case line[0] == ' ' || line[0] == '\t':
			if pos == start {
				return nil, start
			}
		case !IsFieldLine(line):
			return raw[start:pos], pos
		}
		pos = next
	}
	return raw[start:], len(raw)
}

// IsFieldLine reports "Name: value": a non-empty name of printable ASCII
// without spaces, then a colon.
func IsFieldLine(line []byte) bool {
	i := bytes.IndexByte(line, ':')
	if i <= 0 {
		return false
	}
	for _, c := range line[:i] {
		if c < 33 || c > 126 {
			return false
		}
	}
	return true
}
