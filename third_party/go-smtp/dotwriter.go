package smtp

import (
	"bufio"
	"bytes"
)

// dotWriter is net/textproto's DotWriter done a line at a time instead of a
// byte at a time (relaycar): the same output — a leading '.' doubled, a bare
// "\n" written as "\r\n", the data ended by "\r\n.\r\n" — for a fraction of
// the CPU on large messages.
type dotWriter struct {
	w     *bufio.Writer
	state int
}

const (
	dotBegin     = iota // nothing written yet
	dotBeginLine        // just after '\n'
	dotData             // in a line, the last byte was not '\r'
	dotCR               // in a line, the last byte was '\r'
)

func (d *dotWriter) Write(b []byte) (int, error) {
	n := 0
	for n < len(b) {
		if (d.state == dotBegin || d.state == dotBeginLine) && b[n] == '.' {
			if err := d.w.WriteByte('.'); err != nil {
				return n, err
			}
		}
		i := bytes.IndexByte(b[n:], '\n')
		if i < 0 {
			m, err := d.w.Write(b[n:])
			n += m
			d.state = afterLine(d.state, b[n-m:n])
			return n, err
		}
		if i > 0 {
			m, err := d.w.Write(b[n : n+i])
			n += m
			d.state = afterLine(d.state, b[n-m:n])
			if err != nil {
				return n, err
			}
		}
		if d.state != dotCR {
			if err := d.w.WriteByte('\r'); err != nil {
				return n, err
			}
		}
		if err := d.w.WriteByte('\n'); err != nil {
			return n, err
		}
		n++
		d.state = dotBeginLine
	}
	return n, nil
}

// afterLine is the state after writing seg, which holds no '\n', in state
// st. As in textproto, a '\r' after a '\r' is data, so a run of them ends
// in dotCR or dotData by its length.
func afterLine(st int, seg []byte) int {
	if len(seg) == 0 {
		return st
	}
	k := 0
	for k < len(seg) && seg[len(seg)-1-k] == '\r' {
		k++
	}
	odd := k%2 == 1
	if k == len(seg) && st == dotCR {
		odd = !odd
	}
	if odd {
		return dotCR
	}
	return dotData
}

func (d *dotWriter) Close() error {
	switch d.state {
	case dotBegin, dotData:
		d.w.WriteString("\r\n")
	case dotCR:
		d.w.WriteByte('\n')
	}
	d.w.WriteString(".\r\n")
	return d.w.Flush()
}
