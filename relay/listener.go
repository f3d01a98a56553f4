package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// allowListener is where relaycar decides about a connection before
// go-smtp sees it. go-smtp only creates a session at EHLO, which is too
// late: the greeting would already invite the client in. So clients
// outside allowed_networks get 554 at connect, clients beyond
// max_connections get 421 at connect, and every other connection is
// wrapped in a clientConn that counts itself out when it closes.
type allowListener struct {
	net.Listener
	allowed  []netip.Prefix
	trusted  []netip.Prefix // empty: every allowed client is trusted
	maxConns int            // 0: no cap
	log      *slog.Logger
	// refused counts the 554 and 421 answered here; connections is the
	// open-connections gauge.
	refused     *prometheus.CounterVec
	connections prometheus.Gauge

	open  atomic.Int64
	atCap atomic.Bool // for logging the first refusal of a burst at Warn
}

func (l *allowListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip, ok := remoteIP(c.RemoteAddr())
		if !ok || !inNetworks(l.allowed, ip) {
			l.log.Warn("connection refused: network not allowed", "remote_addr", c.RemoteAddr().String())
			l.refuse(c, 554, replyNetworkDenied)
			continue
		}
		// Accept is called from one goroutine, so the check and the Add
		// cannot race with another Accept; Close only lowers the count.
		if n := l.open.Load(); l.maxConns > 0 && n >= int64(l.maxConns) {
			lvl := slog.LevelDebug
			if l.atCap.CompareAndSwap(false, true) {
				lvl = slog.LevelWarn
			}
			l.log.Log(context.Background(), lvl, "connection refused: listen.max_connections reached", "remote_addr", c.RemoteAddr().String(), "open", n)
			l.refuse(c, 421, replyTooManyConns)
			continue
		}
		l.atCap.Store(false)
		l.open.Add(1)
		l.connections.Inc()
		return &clientConn{Conn: c, trusted: len(l.trusted) == 0 || inNetworks(l.trusted, ip), done: make(chan struct{}),
			onClose: func() {
				l.open.Add(-1)
				l.connections.Dec()
			}}, nil
	}
}

// refuse answers a connection that never reaches go-smtp and closes it,
// off the accept loop so a slow peer cannot hold it.
func (l *allowListener) refuse(c net.Conn, code int, reply string) {
	l.refused.WithLabelValues(itoa(code)).Inc()
	go func() {
		// Without a deadline a peer that never reads could hold this
		// goroutine and the socket forever: then close without the reply.
		if c.SetWriteDeadline(time.Now().Add(5*time.Second)) == nil {
			_, _ = c.Write([]byte(reply)) // best effort: the connection is refused either way
		}
		_ = c.Close() // nothing more to do with a refused connection
	}()
}

// clientConn is one accepted SMTP connection: the byte stream below
// go-smtp, which is the only place relaycar can see it.
//
// Read deadlines. go-smtp sets one read deadline per line it reads
// (Server.ReadTimeout, in Conn.readLine) and none while DATA is read, so
// a whole message had to arrive within one read_timeout. And when a
// command line times out half-way, bufio.Reader.ReadLine hands over the
// partial line without the error; go-smtp runs it as a command, counts a
// protocol error, and waits another read_timeout, up to four times. So
// clientConn
//   - passes go-smtp's per-line deadline through for command lines,
//   - while a message is read (between session.Data and session.Reset)
//     sets a fresh deadline before every Read: read_timeout from now,
//     but never past data_timeout from the start of DATA,
//   - and once any read has timed out, fails every later Read with that
//     timeout, so go-smtp's next readLine ends the connection with
//     "421 4.4.2 Idle timeout" instead of waiting again.
//
// Under STARTTLS the *tls.Conn reads through clientConn, so the deadlines
// hold there too; NetConn() finds it again (see clientConnOf).
type clientConn struct {
	net.Conn
	trusted bool
	onClose func()
	done    chan struct{} // closed by Close; ends an AUTH failure delay early
	closed  atomic.Bool

	mu      sync.Mutex
	inData  bool
	perRead time.Duration
	dataEnd time.Time // zero: no cap on the whole message
	readErr error     // the first timeout; sticky

	scan         dotCRScan   // touched only by Read: go-smtp reads from one goroutine
	dotCR        atomic.Bool // scan saw <CRLF>.<CR> not followed by LF
	authFailures atomic.Int32
	// peerEOF: the client closed its side. go-smtp ends a BDAT chunk cut
	// short by EOF as if it were complete, so a message read while this
	// was set may be truncated.
	peerEOF atomic.Bool
}

func (c *clientConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	failed, inData, per, end := c.readErr, c.inData, c.perRead, c.dataEnd
	c.mu.Unlock()
	if failed != nil {
		return 0, failed
	}
	if inData && per > 0 {
		dl := time.Now().Add(per)
		if !end.IsZero() && end.Before(dl) {
			dl = end
		}
		if err := c.Conn.SetReadDeadline(dl); err != nil {
			return 0, err
		}
	}
	n, err := c.Conn.Read(p)
	if c.scan.feed(p[:n]) {
		c.dotCR.Store(true)
	}
	if errors.Is(err, io.EOF) {
		c.peerEOF.Store(true)
	}
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		c.mu.Lock()
		c.readErr = err
		c.mu.Unlock()
	}
	return n, err
}

func (c *clientConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		close(c.done)
		if c.onClose != nil {
			c.onClose()
		}
	}
	return c.Conn.Close()
}

// startData switches to per-read deadlines for one message.
func (c *clientConn) startData(perRead, whole time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inData, c.perRead, c.dataEnd = true, perRead, time.Time{}
	if whole > 0 {
		c.dataEnd = time.Now().Add(whole)
	}
}

// endData returns to go-smtp's per-line deadlines. go-smtp calls
// session.Reset after it has discarded what Data left unread, so that
// discarding still runs under the message's deadlines.
func (c *clientConn) endData() {
	c.mu.Lock()
	c.inData = false
	c.mu.Unlock()
}

// timedOut reports whether a read on this connection has timed out; the
// connection is then finished, whatever line go-smtp is still handling.
func (c *clientConn) timedOut() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readErr != nil
}

// clientConnOf finds the clientConn under go-smtp's net.Conn, which is a
// *tls.Conn after STARTTLS. It is nil only for connections that did not
// come through allowListener.
func clientConnOf(c net.Conn) *clientConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	cc, _ := c.(*clientConn)
	return cc
}

// dotCRScan finds <CR><LF>.<CR> followed by anything but <LF> in a raw
// byte stream. go-smtp's DATA reader (data.go) removes a dot at the start
// of a line as dot-stuffing and then, in its stateDotCR, drops the CR as
// well when no LF follows: "a\r\n.\rb" reaches Session.Data as "a\r\nb",
// so the bare CR cannot be seen there. A legitimate client never sends
// this sequence, in DATA or outside it; the scan runs over the whole
// plaintext stream, so bytes go-smtp read ahead before Data started are
// covered too.
type dotCRScan struct {
	tail [4]byte
	n    int
}

const dotCRSeq = "\r\n.\r"

// feed scans p, continuing the previous call's last four bytes, and
// reports whether the sequence was seen.
func (s *dotCRScan) feed(p []byte) bool {
	if len(p) == 0 {
		return false
	}
	var w [8]byte
	seam := append(append(w[:0], s.tail[:s.n]...), p[:min(4, len(p))]...)
	hit := hasDotCR(seam) || hasDotCR(p)
	if len(p) >= 4 {
		s.n = copy(s.tail[:], p[len(p)-4:])
	} else {
		s.n = copy(s.tail[:], seam[max(0, len(seam)-4):])
	}
	return hit
}

// hasDotCR reports <CR><LF>.<CR> followed by a byte other than <LF>
// within b; a sequence at the very end of b is left to the next feed.
func hasDotCR(b []byte) bool {
	for off := 0; off < len(b); {
		i := bytes.Index(b[off:], []byte(dotCRSeq))
		if i < 0 {
			return false
		}
		if k := off + i + len(dotCRSeq); k < len(b) && b[k] != '\n' {
			return true
		}
		off += i + 1
	}
	return false
}

func remoteIP(a net.Addr) (netip.Addr, bool) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	return ip.Unmap(), ok
}

func inNetworks(nets []netip.Prefix, ip netip.Addr) bool {
	for _, p := range nets {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}
