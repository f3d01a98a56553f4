// Command bench is the Go half of tools/postfix-reference.sh, the
// smtp-source benchmark that compares relaycar with a stock Postfix relay.
// It has three subcommands; all talk to or serve on 127.0.0.1 only and are
// bounded in count and time.
//
//	bench time [-counter FILE -want N] [-timeout 2m] -- smtp-source ARGS...
//
// runs the command (smtp-source) and prints "accept=SECONDS e2e=SECONDS":
// accept is the command's wall time; e2e is the time from the command's
// start until the smtp-sink whose -c counter output is in FILE has counted
// N more messages than when the command started ("-" without -counter).
// It exits non-zero if the command fails or the sink falls short by -timeout.
//
//	bench latency -addr 127.0.0.1:2525 -n 1000 -size 2048 [-auth user:pass]
//
// sends N messages one after another, one connection per message, and
// prints p50/p99/max of connect -> 250-after-DATA (greeting, EHLO, MAIL,
// RCPT, DATA and the body until the server's reply to the final dot; QUIT
// and close are outside the timer), plus the resulting msgs/s.
//
//	bench floor -addr 127.0.0.1:2525 [-dir DIR] [-max-time 15m]
//
// serves SMTP with the go-smtp that relaycar builds (third_party/go-smtp,
// its default settings) and nothing else: with -dir it answers 250 after
// writing the message over one preallocated 1 MiB file in DIR (a larger
// message extends it once) and fdatasyncing it (no file created, renamed
// or removed, no routing, no delivery); without -dir it discards the
// message. At one session this is the most a durable relay built on
// go-smtp can accept on this machine, so relaycar's distance from it is
// relaycar's own work.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "time":
		timeCmd(os.Args[2:])
	case "latency":
		latencyCmd(os.Args[2:])
	case "floor":
		floorCmd(os.Args[2:])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: bench time [-counter FILE -want N] [-timeout D] -- CMD ARGS...\n       bench latency -addr HOST:PORT [-n N] [-size BYTES]\n       bench floor -addr HOST:PORT [-dir DIR] [-max-time D]")
	os.Exit(2)
}

func timeCmd(args []string) {
	fs := flag.NewFlagSet("time", flag.ExitOnError)
	counter := fs.String("counter", "", "smtp-sink -c output file to watch for end-to-end time")
	want := fs.Int64("want", 0, "messages the sink must count (beyond its count at start)")
	timeout := fs.Duration("timeout", 2*time.Minute, "upper bound for the command plus the sink wait")
	fs.Parse(args)
	argv := fs.Args()
	if len(argv) == 0 {
		usage()
	}
	deadline := time.Now().Add(*timeout)
	var base int64
	if *counter != "" {
		n, err := sinkCount(*counter)
		if err != nil {
			fatal("%v", err)
		}
		base = n
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.WaitDelay = 2 * time.Second

	start := time.Now()
	// Watch the sink while the command runs, so the end-to-end time is the
	// moment the count was reached, not when we first looked after the command.
	e2e := make(chan time.Duration, 1)
	if *counter != "" {
		go func() {
			for time.Now().Before(deadline) {
				if n, err := sinkCount(*counter); err == nil && n-base >= *want {
					e2e <- time.Since(start)
					return
				}
				time.Sleep(2 * time.Millisecond)
			}
			e2e <- -1
		}()
	}
	err := cmd.Run()
	accept := time.Since(start)
	if err != nil {
		fatal("%s: %v", argv[0], err)
	}
	if *counter == "" {
		fmt.Printf("accept=%.4f e2e=-\n", accept.Seconds())
		return
	}
	d := <-e2e
	if d < 0 {
		n, _ := sinkCount(*counter)
		fmt.Printf("accept=%.4f e2e=-\n", accept.Seconds())
		fatal("sink counted %d of %d messages within %s", n-base, *want, *timeout)
	}
	fmt.Printf("accept=%.4f e2e=%.4f\n", accept.Seconds(), d.Seconds())
}

// sinkCount returns the last "mesg=N" that smtp-sink -c wrote to path. The
// counters are records like "sess=3 quit=3 mesg=3\r", appended as they change.
func sinkCount(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if st.Size() == 0 {
		return 0, nil
	}
	off := max(0, st.Size()-128)
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
		return 0, err
	}
	// Use the last complete record (one that ends in \r or \n).
	end := bytes.LastIndexAny(buf, "\r\n")
	if end < 0 {
		return 0, fmt.Errorf("%s: no counter record", path)
	}
	rec := buf[:end]
	i := bytes.LastIndex(rec, []byte("mesg="))
	if i < 0 {
		return 0, fmt.Errorf("%s: no mesg= counter", path)
	}
	num := rec[i+len("mesg="):]
	if j := bytes.IndexAny(num, " \t\r\n"); j >= 0 {
		num = num[:j]
	}
	return strconv.ParseInt(string(num), 10, 64)
}

func latencyCmd(args []string) {
	fs := flag.NewFlagSet("latency", flag.ExitOnError)
	addr := fs.String("addr", "", "SMTP server, host:port (loopback only)")
	n := fs.Int("n", 1000, "messages, sent one after another, one connection each")
	size := fs.Int("size", 2048, "payload bytes (after the headers, as smtp-source -l)")
	from := fs.String("from", "from@example.com", "envelope sender")
	to := fs.String("to", "to@example.net", "envelope recipient")
	maxTime := fs.Duration("max-time", 2*time.Minute, "upper bound for the whole run")
	auth := fs.String("auth", "", "user:password: AUTH PLAIN on every connection, as PHPMailer does")
	fs.Parse(args)
	mustLoopback(*addr)
	var login sasl.Client
	if *auth != "" {
		user, pass, ok := strings.Cut(*auth, ":")
		if !ok {
			fatal("-auth wants user:password")
		}
		login = sasl.NewPlainClient("", user, pass)
	}
	if *n < 1 || *n > 100000 {
		fatal("-n out of range")
	}
	payload := body(*size)
	lat := make([]time.Duration, 0, *n)
	deadline := time.Now().Add(*maxTime)
	start := time.Now()
	for i := range *n {
		if time.Now().After(deadline) {
			fatal("sent only %d of %d messages within %s", i, *n, *maxTime)
		}
		msg := fmt.Sprintf("From: <%s>\r\nTo: <%s>\r\nDate: %s\r\nMessage-Id: <%d.%d@bench.localdomain>\r\n\r\n%s",
			*from, *to, time.Now().Format(time.RFC1123Z), start.UnixNano(), i, payload)
		t0 := time.Now()
		c, err := sendOne(*addr, login, *from, *to, msg, deadline)
		if err != nil {
			fatal("message %d: %v", i+1, err)
		}
		lat = append(lat, time.Since(t0))
		c.Quit() // outside the timer
		c.Close()
	}
	elapsed := time.Since(start)
	slices.Sort(lat)
	fmt.Printf("n=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f rate=%.1f\n", len(lat),
		msec(lat[len(lat)/2]), msec(lat[(len(lat)*99)/100]), msec(lat[len(lat)-1]),
		float64(len(lat))/elapsed.Seconds())
}

// sendOne opens a connection and sends one message; it returns once the
// server has answered the final dot, leaving QUIT to the caller. With
// login it authenticates first (inside the timer: it is part of the
// message's cost to such a client).
func sendOne(addr string, login sasl.Client, from, to, msg string, deadline time.Time) (*smtp.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(deadline)
	c := smtp.NewClient(conn)
	if err := c.Hello("bench.localdomain"); err != nil {
		c.Close()
		return nil, err
	}
	if login != nil {
		if err := c.Auth(login); err != nil {
			c.Close()
			return nil, err
		}
	}
	if err := c.SendMail(from, []string{to}, strings.NewReader(msg)); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// body is size bytes of 78-character lines plus CRLF, like smtp-source -l.
func body(size int) string {
	var b strings.Builder
	line := strings.Repeat("X", 78) + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	s := b.String()[:size]
	if !strings.HasSuffix(s, "\r\n") {
		s = s[:len(s)-2] + "\r\n"
	}
	return s
}

// mustLoopback keeps every server this tool talks to or runs on this machine.
func mustLoopback(addr string) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		fatal("-addr must be a loopback host:port, got %q", addr)
	}
}

func msec(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	os.Exit(1)
}

func floorCmd(args []string) {
	fs := flag.NewFlagSet("floor", flag.ExitOnError)
	addr := fs.String("addr", "", "listen address, loopback host:port")
	dir := fs.String("dir", "", "write each message over DIR/floor.dat and fdatasync it before 250 (default: discard)")
	maxTime := fs.Duration("max-time", 15*time.Minute, "exit after this long")
	fs.Parse(args)
	mustLoopback(*addr)
	be, err := newFloorBackend(*dir)
	if err != nil {
		fatal("%v", err)
	}
	defer be.Close()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fatal("%v", err)
	}
	s := floorServer(be)
	time.AfterFunc(*maxTime, func() { s.Close() })
	if err := s.Serve(ln); err != nil && !errors.Is(err, smtp.ErrServerClosed) {
		fatal("%v", err)
	}
}

func floorServer(be *floorBackend) *smtp.Server {
	s := smtp.NewServer(be)
	s.Domain = "floor.localdomain"
	s.ReadTimeout, s.WriteTimeout = time.Minute, time.Minute
	s.MaxMessageBytes = 64 << 20
	return s
}

// newFloorBackend writes and syncs DIR/floor.dat once, so that each
// message overwrites blocks the file already has: no allocation, no size
// change. An empty dir discards instead.
func newFloorBackend(dir string) (*floorBackend, error) {
	be := &floorBackend{}
	if dir == "" {
		return be, nil
	}
	f, err := os.OpenFile(filepath.Join(dir, "floor.dat"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.Write(make([]byte, 1<<20)); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	be.f = f
	return be, nil
}

// floorBackend is the whole of the floor server: every session shares the
// one file, one message at a time.
type floorBackend struct {
	mu sync.Mutex
	f  *os.File // nil: discard
}

func (b *floorBackend) Close() error {
	if b.f == nil {
		return nil
	}
	return b.f.Close()
}

func (b *floorBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	return &floorSession{b: b}, nil
}

type floorSession struct {
	b   *floorBackend
	buf bytes.Buffer
}

func (s *floorSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *floorSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *floorSession) Reset()                               {}
func (s *floorSession) Logout() error                        { return nil }

func (s *floorSession) Data(r io.Reader) error {
	if s.b.f == nil {
		_, err := io.Copy(io.Discard, r)
		return err
	}
	s.buf.Reset()
	if _, err := s.buf.ReadFrom(r); err != nil {
		return err
	}
	s.b.mu.Lock()
	defer s.b.mu.Unlock()
	if _, err := s.b.f.WriteAt(s.buf.Bytes(), 0); err != nil {
		return err
	}
	return datasync(s.b.f)
}
