package smtp

// Tests for relaycar's bulk fast paths: each must give exactly what the
// byte-at-a-time code it replaced gives, for any input and any way of
// splitting it into reads and writes.

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math/rand"
	"net"
	"net/textproto"
	"slices"
	"testing"
	"testing/iotest"
	"time"
)

// randomText is made mostly of the bytes the state machines care about.
func randomText(rng *rand.Rand, n int) []byte {
	const alphabet = "..\r\r\n\n\nab"
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[rng.Intn(len(alphabet))]
	}
	return b
}

// chunked writes b to w in random-sized pieces.
func chunked(rng *rand.Rand, w io.Writer, b []byte) error {
	for len(b) > 0 {
		k := 1 + rng.Intn(min(len(b), 300))
		if _, err := w.Write(b[:k]); err != nil {
			return err
		}
		b = b[k:]
	}
	return nil
}

func TestDotWriterMatchesTextproto(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 5000; i++ {
		in := randomText(rng, rng.Intn(400))
		if i%10 == 0 {
			in = append(bytes.Repeat([]byte("x"), 5000+rng.Intn(9000)), in...)
		}

		var want bytes.Buffer
		ww := textproto.NewWriter(bufio.NewWriter(&want)).DotWriter()
		if err := chunked(rng, ww, in); err != nil {
			t.Fatal(err)
		}
		ww.Close()

		var got bytes.Buffer
		gw := &dotWriter{w: bufio.NewWriterSize(&got, 16+rng.Intn(5000))}
		if err := chunked(rng, gw, in); err != nil {
			t.Fatal(err)
		}
		gw.Close()

		if !bytes.Equal(got.Bytes(), want.Bytes()) {
			g, w := got.Bytes(), want.Bytes()
			k := 0
			for k < len(g) && k < len(w) && g[k] == w[k] {
				k++
			}
			t.Fatalf("input %d bytes, first difference at %d:\n got %q\nwant %q", len(in), k, g[max(0, k-20):min(len(g), k+40)], w[max(0, k-20):min(len(w), k+40)])
		}
	}
}

// byteDataReader is go-smtp v0.26.0's dataReader.Read before the fast path.
func byteDataReader(r *dataReader, b []byte) (n int, err error) {
	if r.limited {
		if r.n <= 0 {
			return 0, ErrDataTooLarge
		}
		if int64(len(b)) > r.n {
			b = b[0:r.n]
		}
	}
	const (
		stateBeginLine = iota
		stateDot
		stateDotCR
		stateCR
		stateData
		stateEOF
	)
	for n < len(b) && r.state != stateEOF {
		var c byte
		c, err = r.r.ReadByte()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			break
		}
		switch r.state {
		case stateBeginLine:
			if c == '.' {
				r.state = stateDot
				continue
			}
			if c == '\r' {
				r.state = stateCR
				break
			}
			r.state = stateData
		case stateDot:
			if c == '\r' {
				r.state = stateDotCR
				continue
			}
			r.state = stateData
		case stateDotCR:
			if c == '\n' {
				r.state = stateEOF
				continue
			}
			r.state = stateData
		case stateCR:
			if c == '\n' {
				r.state = stateBeginLine
				break
			}
			r.state = stateData
		case stateData:
			if c == '\r' {
				r.state = stateCR
			}
		}
		b[n] = c
		n++
	}
	if err == nil && r.state == stateEOF {
		err = io.EOF
	}
	if r.limited {
		r.n -= int64(n)
	}
	return
}

type readFunc func(b []byte) (int, error)

func (f readFunc) Read(b []byte) (int, error) { return f(b) }

// drain reads r with random buffer sizes until an error and returns what
// was read, the error and what is left in the underlying reader.
func drain(rng *rand.Rand, r io.Reader, under *bufio.Reader) ([]byte, error, []byte) {
	var out []byte
	for {
		b := make([]byte, 1+rng.Intn(200))
		n, err := r.Read(b)
		out = append(out, b[:n]...)
		if err != nil {
			rest, _ := io.ReadAll(under)
			return out, err, rest
		}
	}
}

func TestDataReaderMatchesByteLoop(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	for i := 0; i < 5000; i++ {
		in := randomText(rng, rng.Intn(600))
		switch i % 4 {
		case 0:
			in = append(in, "\r\n.\r\nQUIT\r\n"...)
		case 1:
			in = append(bytes.Repeat([]byte("y"), 3000+rng.Intn(5000)), in...)
		}
		limit := int64(0)
		if i%3 == 0 {
			limit = int64(1 + rng.Intn(700))
		}
		seed := rng.Int63()
		bufSize := 16 + rng.Intn(400)

		run := func(read func(*dataReader, []byte) (int, error)) ([]byte, error, []byte) {
			// OneByteReader and HalfReader make the bufio.Reader refill at
			// odd places.
			var src io.Reader = bytes.NewReader(in)
			if seed%2 == 0 {
				src = iotest.HalfReader(src)
			}
			br := bufio.NewReaderSize(src, bufSize)
			dr := &dataReader{r: br, limited: limit > 0, n: limit}
			return drain(rand.New(rand.NewSource(seed)), readFunc(func(b []byte) (int, error) { return read(dr, b) }), br)
		}
		want, wantErr, wantRest := run(byteDataReader)
		got, gotErr, gotRest := run((*dataReader).Read)
		if !bytes.Equal(got, want) || !errors.Is(gotErr, wantErr) || !bytes.Equal(gotRest, wantRest) {
			t.Fatalf("input %q limit %d:\n got %q %v rest %q\nwant %q %v rest %q", in, limit, got, gotErr, gotRest, want, wantErr, wantRest)
		}
	}
}

// byteLineLimit is go-smtp v0.26.0's lineLimitReader.Read before the fast path.
func byteLineLimit(r *lineLimitReader, b []byte) (int, error) {
	if r.curLineLength > r.LineLimit && r.LineLimit > 0 {
		return 0, ErrTooLongLine
	}
	n, err := r.R.Read(b)
	if err != nil {
		return n, err
	}
	if r.LineLimit == 0 {
		return n, nil
	}
	for _, chr := range b[:n] {
		if chr == '\n' {
			r.curLineLength = 0
		}
		r.curLineLength++
		if r.curLineLength > r.LineLimit {
			return 0, ErrTooLongLine
		}
	}
	return n, nil
}

func TestLineLimitReaderMatchesByteLoop(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	for i := 0; i < 5000; i++ {
		in := randomText(rng, rng.Intn(2000))
		if i%2 == 0 {
			in = append(in, bytes.Repeat([]byte("z"), rng.Intn(300))...)
		}
		limit := rng.Intn(120)
		seed := rng.Int63()
		run := func(read func(*lineLimitReader, []byte) (int, error)) ([]byte, error) {
			lr := &lineLimitReader{R: bytes.NewReader(in), LineLimit: limit}
			rrng := rand.New(rand.NewSource(seed))
			var out []byte
			for tries := 0; tries < 10000; tries++ {
				b := make([]byte, 1+rrng.Intn(150))
				n, err := read(lr, b)
				out = append(out, b[:n]...)
				if err != nil {
					// A failed reader keeps failing.
					if _, again := read(lr, b); err == ErrTooLongLine && again != ErrTooLongLine {
						return nil, errors.New("ErrTooLongLine not sticky")
					}
					return out, err
				}
			}
			return nil, errors.New("no end")
		}
		want, wantErr := run(byteLineLimit)
		got, gotErr := run((*lineLimitReader).Read)
		if !bytes.Equal(got, want) || gotErr != wantErr {
			t.Fatalf("input %q limit %d:\n got %q %v\nwant %q %v", in, limit, got, gotErr, want, wantErr)
		}
	}
}

// countingConn records each Write it is given.
type countingConn struct {
	net.Conn
	writes []string
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.writes = append(c.writes, string(b))
	return len(b), nil
}

func (c *countingConn) SetWriteDeadline(time.Time) error { return nil }

func TestWriteResponseIsOneWrite(t *testing.T) {
	cc := &countingConn{}
	s := NewServer(nil)
	s.WriteTimeout = time.Second
	c := newConn(cc, s)
	c.writeResponse(250, NoEnhancedCode, "relay.local", "PIPELINING", "8BITMIME\nSIZE 1000")
	c.writeResponse(250, EnhancedCode{2, 1, 0}, "OK")
	want := []string{
		"250-relay.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n",
		"250 2.1.0 OK\r\n",
	}
	if !slices.Equal(cc.writes, want) {
		t.Errorf("writes = %q, want %q", cc.writes, want)
	}
}
