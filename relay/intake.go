package relay

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// Intake streams DATA into the spool: nothing on this path holds a whole
// message, only the header section (bounded by maxHeaderBytes) and a few
// buffers, which the session reserves from the memory budget up front.
const (
	// maxHeaderBytes bounds the header section read before the first body
	// byte is spooled: routing and the header rewrite need all of it.
	// Postfix's header_size_limit is 100 KiB; more is refused with 552.
	maxHeaderBytes = 256 << 10
	// intakeReserve is what one DATA may hold: the header section, the
	// spool writer's buffer (64 KiB), the copy buffer and slack.
	intakeReserve = maxHeaderBytes + 128<<10
	readBufSize   = 32 << 10
)

var (
	errBareLF        = errors.New("bare CR or LF in message")
	errHeaderTooLong = errors.New("header section too large")
)

// crlfReader checks line endings as the bytes pass: it fails with
// errBareLF at the first CR not followed by LF or LF not preceded by CR
// (the SMTP smuggling family, CVE-2023-51764), or, when normalize is set,
// turns each of them into CRLF as Postfix does for bare newlines.
type crlfReader struct {
	r         io.Reader
	normalize bool
	cr        bool   // the last byte seen was CR
	in        []byte // normalize: bytes read, not yet converted
	out       []byte // normalize: converted bytes not yet returned
	err       error
}

func newCRLFReader(r io.Reader, normalize bool) *crlfReader {
	c := &crlfReader{r: r, normalize: normalize}
	if normalize {
		c.in = make([]byte, 16<<10)
	}
	return c
}

func (c *crlfReader) Read(p []byte) (int, error) {
	if !c.normalize {
		return c.check(p)
	}
	for len(c.out) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		n, err := c.r.Read(c.in)
		c.out = c.convert(c.out[:0], c.in[:n])
		if err != nil {
			if err == io.EOF && c.cr {
				c.out = append(c.out, '\n')
				c.cr = false
			}
			c.err = err
		}
	}
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n, nil
}

// check passes bytes through unchanged and fails at the first bare one.
func (c *crlfReader) check(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.r.Read(p)
	if i := c.bare(p[:n]); i >= 0 {
		c.err = errBareLF
		return i, c.err
	}
	if err == io.EOF && c.cr {
		err = errBareLF
	}
	if err != nil {
		c.err = err
	}
	return n, err
}

// bare returns the index of the first bare CR or LF in p, or -1, and
// carries a trailing CR over to the next read. The common case (every LF
// after a CR, as many CRs as LFs) runs on bytes.IndexByte and bytes.Count,
// not a loop over every byte: this is on the path of every message byte.
func (c *crlfReader) bare(p []byte) int {
	if len(p) == 0 {
		return -1
	}
	if c.cr && p[0] != '\n' {
		return 0
	}
	lf := 0
	for i := 0; ; {
		j := bytes.IndexByte(p[i:], '\n')
		if j < 0 {
			break
		}
		k := i + j
		if (k == 0 && !c.cr) || (k > 0 && p[k-1] != '\r') {
			return k
		}
		lf++
		i = k + 1
	}
	paired := lf // CRs in p followed by an LF in p
	if c.cr {
		paired-- // p[0] is the LF of the previous read's CR
	}
	trailing := p[len(p)-1] == '\r'
	crs := bytes.Count(p, []byte{'\r'})
	if trailing {
		crs--
	}
	if crs != paired {
		// A CR followed by something other than LF: find it.
		for i := 0; i < len(p)-1; i++ {
			if p[i] == '\r' && p[i+1] != '\n' {
				return i + 1
			}
		}
	}
	c.cr = trailing
	return -1
}

func (c *crlfReader) convert(out, in []byte) []byte {
	for _, b := range in {
		if c.cr {
			c.cr = false
			out = append(out, '\n')
			if b == '\n' {
				continue
			}
		}
		switch b {
		case '\r':
			out = append(out, '\r')
			c.cr = true
		case '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, b)
		}
	}
	return out
}

// readHeaderSection reads from br up to the end of the header section as
// mailhdr.Split sees it: the blank line, or the first line that is neither
// a field nor a continuation (that line, which starts the body, is
// included; so is an mbox "From " line at the start). At EOF it returns
// what there was. Only the header is held; the body streams on from br.
func readHeaderSection(br *bufio.Reader, limit int) ([]byte, error) {
	var hdr []byte
	first := true
	for {
		line, err := readLine(br, limit-len(hdr))
		hdr = append(hdr, line...)
		if err == io.EOF {
			return hdr, nil
		}
		if err != nil {
			return hdr, err
		}
		content := line[:len(line)-1]
		if n := len(content); n > 0 && content[n-1] == '\r' {
			content = content[:n-1]
		}
		switch {
		case first && len(content) >= 5 && string(content[:5]) == "From ":
			continue // mbox separator; mailhdr.Split drops it
		case len(content) == 0:
			return hdr, nil
		case content[0] == ' ' || content[0] == '\t':
			if first {
				return hdr, nil
			}
		case !isFieldLine(content):
			return hdr, nil
		}
		first = false
	}
}

// readLine returns one line with its LF, or what is left before EOF
// (with io.EOF), failing once it would pass limit bytes.
func readLine(br *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > limit {
			return nil, errHeaderTooLong
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case err == io.EOF:
			return line, io.EOF
		default:
			return line, err
		}
	}
}
