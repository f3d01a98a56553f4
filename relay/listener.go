package relay

import (
	"log/slog"
	"net"
	"net/netip"
	"time"
)

// allowListener answers clients outside allowed_networks with 554 at
// connect. go-smtp only creates a session at EHLO, which is too late: the
// greeting would already invite the client in.
type allowListener struct {
	net.Listener
	allowed []netip.Prefix
	log     *slog.Logger
	denied  func()
}

func (l *allowListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.allows(c.RemoteAddr()) {
			return c, nil
		}
		l.log.Warn("connection refused: network not allowed", "remote_addr", c.RemoteAddr().String())
		if l.denied != nil {
			l.denied()
		}
		go func() {
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte(replyNetworkDenied))
			c.Close()
		}()
	}
}

func (l *allowListener) allows(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	for _, p := range l.allowed {
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
