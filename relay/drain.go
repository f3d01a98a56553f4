package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/relaycar/relaycar/internal/errreader"
	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// routeHeader names the route a drained message was accepted for: the
// X-Relay-* headers that chose it were removed at intake, and without it
// the peer could route the message elsewhere (past a redirect_all_to).
// The peer honours it from trusted clients only, like every X-Relay-*.
const routeHeader = "X-Relay-Drain-Route"

// hopHeader carries a message's drain count to the peer it is drained to
// (DESIGN.md's name). The peer's intake removes it and keeps the count in
// its envelope (prepare), so it never reaches a provider.
const hopHeader = "X-Relaycar-Drained"

// maxDrainHops: a message drained this often in a row, with no delivery
// attempt in between, stays where it is, so relays draining into each
// other (or a Service that routes back to the shutting-down pod) cannot
// pass it around forever. An attempt starts the count again: rollouts
// during one provider outage drain the same message many times, and each
// relay tried it first.
const maxDrainHops = 3

// hopsInARow is how often env was drained since its last attempt.
func hopsInARow(env *Envelope) int {
	if env.Attempts > 0 {
		return 0
	}
	return env.Hops
}

// drainHops reads a hop header's value; anything but a small number is 0.
func drainHops(v string) int {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < 0 {
		return 0
	}
	return min(n, maxDrainHops)
}

// DrainResult counts what a drain did.
type DrainResult struct {
	// Drained messages were taken by the peer and removed here.
	Drained, Recipients int
	// Left stayed in the spool (peer refused or unreachable, hop limit).
	Left int
	// Dead letters stay for `relaycar queue dead`: those already there,
	// never drained, and drained messages' recipients that had failed.
	Dead int
}

// Drainer hands the pending recipients of spooled messages to a peer
// relaycar over SMTP: the same bytes and Message-ID, removed here only
// after the peer's 250. It is what a relay does after shutdown.grace with
// shutdown.drain_to set, and what `relaycar drain` does for a spool whose
// relay is gone.
type Drainer struct {
	// To is the peer's SMTP address, host:port.
	To string
	// Hostname is the EHLO name.
	Hostname string
	// Timeout bounds each SMTP command and each message's DATA.
	Timeout time.Duration
	// ConnectFor is how long to keep trying to reach the peer.
	ConnectFor time.Duration
	Log        *slog.Logger
	// Redirect is a route's redirect_all_to, nil for none or an unknown
	// route. A staging route's mail is handed over already redirected, so
	// a peer that cannot honour the route header (it lacks the route, or
	// does not trust this relay) still mails only those addresses.
	Redirect func(route string) []string
}

// Drain offers the pending recipients of envs, messages of sp, to the
// peer until ctx ends. envs is the caller's latest state of each message
// (serve's in-memory queue: an update the disk could not take must not
// send delivered recipients again). The caller owns sp: serve after its
// workers stopped, or the drain command with the lock.
func (d Drainer) Drain(ctx context.Context, sp *spool.Spool, envs []*Envelope) DrainResult {
	var res DrainResult
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	if d.Timeout <= 0 {
		d.Timeout = 30 * time.Second
	}
	if dead, err := sp.Dead(); err == nil {
		res.Dead = len(dead)
	}
	var c *drainConn
	defer func() {
		if c != nil {
			c.quit()
		}
	}()
	for i, env := range envs {
		if len(pendingRcpts(env)) == 0 {
			continue
		}
		log := d.Log.With("msg_id", env.ID, "to", d.To)
		if hops := hopsInARow(env); hops >= maxDrainHops {
			res.Left++
			log.Warn("message not drained: it was drained too often without a delivery attempt (a drain loop?)", "hops", hops)
			continue
		}
		var n int
		var err error
		// A connection the peer closed between two transactions (a peer
		// that is itself shutting down closes idle sessions) fails the
		// next message before the peer could take it: that one message
		// is tried once more on a new connection.
		for try := 0; try < 2; try++ {
			if c == nil {
				if c, err = d.dial(ctx); err != nil {
					res.Left += countPending(envs[i:])
					log.Error("drain peer unreachable; messages stay in the spool", "err", err, "left", res.Left)
					return res
				}
			}
			var m int
			m, err = d.drainOne(ctx, c, sp, env)
			n += m
			retry := c.broken && !c.sentAll && ctx.Err() == nil
			if c.broken {
				c.close()
				c = nil
			}
			if err == nil || !retry {
				break
			}
			log.Info("drain connection lost before the peer took the message; trying it on a new connection", "err", err)
		}
		if err != nil {
			res.Left++
			log.Warn("message not drained; it stays in the spool", "err", err)
			continue
		}
		// Recipients that failed for good stay here as a dead letter with
		// their reason: the peer took only the pending ones.
		bury := len(env.Failures) > 0
		if bury {
			err = sp.Bury(env, deadReason(env), time.Now())
		} else {
			err = sp.Remove(env.ID)
		}
		if err != nil {
			// The peer has it; a rerun would hand it over again.
			res.Left++
			log.Error("drained message could not be removed or dead-lettered here; a rerun would hand it over again", "err", err)
			continue
		}
		res.Drained++
		res.Recipients += n
		log.Info("message drained to peer", "rcpt_count", n, "message_id", env.MessageID)
		if bury {
			res.Dead++
			log.Info("message dead-lettered", "reason", env.DeadReason, "age", time.Since(env.ReceivedAt).Round(time.Second).String())
		}
	}
	return res
}

// drainOne hands env's pending recipients over, one transaction per route
// so each carries its route; after each accepted route its recipients are
// no longer pending here, so a failure later hands over only the rest.
func (d Drainer) drainOne(ctx context.Context, c *drainConn, sp *spool.Spool, env *Envelope) (int, error) {
	n := 0
	for i := range env.Routes {
		rs := &env.Routes[i]
		if len(rs.Pending) == 0 {
			continue
		}
		if rs.Pinned != "" {
			// There is no waiting for the pinned upstream once the pod is
			// going away; say so rather than risk a double silently.
			d.Log.Warn("handing over a message whose last attempt at an upstream had an unknown outcome: if that upstream took it, these recipients get it twice",
				"msg_id", env.ID, "upstream", rs.Pinned, "route", rs.Route, "rcpt_count", len(rs.Pending))
		}
		var redirect []string
		if d.Redirect != nil {
			redirect = d.Redirect(rs.Route)
		}
		if err := d.send(ctx, c, sp, env, rs.Route, rs.Pending, redirect); err != nil {
			if n > 0 {
				// Part went: record it, or a rerun sends that part again.
				if uerr := sp.Update(env); uerr != nil {
					d.Log.Error("recording a partly drained message failed; a rerun may hand part of it over again", "msg_id", env.ID, "err", uerr)
				}
			}
			return n, err
		}
		n += len(rs.Pending)
		rs.Pending, rs.Pinned = nil, ""
	}
	return n, nil
}

// drainConn is one SMTP session with the peer.
type drainConn struct {
	conn   net.Conn
	c      *smtp.Client
	utf8   bool
	broken bool // a transport error: dial again for the next message
	// sentAll: the last transaction's final dot went out, so after a
	// transport error the peer may have the message.
	sentAll bool
}

func (c *drainConn) quit() {
	if !c.broken {
		_ = c.c.Quit() // the peer has everything it will get
	}
	c.close()
}

func (c *drainConn) close() {
	c.c.Close()
	c.conn.Close()
}

// dial connects to the peer, trying again every half second until ctx
// ends: a Service may first pick a pod that is itself going away, or the
// peer may be restarting.
func (d Drainer) dial(ctx context.Context) (*drainConn, error) {
	ctx, cancel := context.WithTimeout(ctx, max(d.ConnectFor, time.Millisecond))
	defer cancel()
	for {
		c, err := d.dialOnce(ctx)
		if err == nil || ctx.Err() != nil {
			return c, err
		}
		d.Log.Warn("drain peer not reachable yet; trying again", "to", d.To, "err", err)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (d Drainer) dialOnce(ctx context.Context) (*drainConn, error) {
	dl := net.Dialer{Timeout: d.Timeout}
	conn, err := dl.DialContext(ctx, "tcp", d.To)
	if err != nil {
		return nil, err
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = d.Timeout, d.Timeout
	hostname := d.Hostname
	if hostname == "" {
		hostname = "localhost"
	}
	if err := c.Hello(hostname); err != nil {
		c.Close()
		conn.Close()
		return nil, err
	}
	utf8, _ := c.Extension("SMTPUTF8")
	return &drainConn{conn: conn, c: c, utf8: utf8}, nil
}

// send runs one transaction for env's pending recipients, or for
// redirect instead of them. A recipient the peer refuses aborts it before
// DATA: the whole message then stays here, rather than half of it going
// and the rest being tracked twice.
func (d Drainer) send(ctx context.Context, dc *drainConn, sp *spool.Spool, env *Envelope, route string, rcpts, redirect []string) (err error) {
	dc.sentAll = false
	body, err := sp.OpenBody(env.ID)
	if err != nil {
		return fmt.Errorf("reading the spooled message: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { dc.conn.Close() })
	defer stop()
	defer func() {
		// A transport error, or a 421: the peer is closing the session (a
		// relaycar that began its own shutdown answers MAIL so and keeps
		// the connection until its transactions end). Either way the next
		// try needs a new connection.
		var se *smtp.SMTPError
		if err != nil && (!errors.As(err, &se) || se.Code == 421) {
			dc.broken = true
		}
	}()
	defer body.Close()
	var msg upstreams.Body = body
	extra := fmt.Sprintf("%s: %d\r\n%s: %s\r\n", hopHeader, hopsInARow(env)+1, routeHeader, route)
	if len(redirect) > 0 {
		// As delivery would send it: the peer gets a message to redirect
		// with the originals in X-Original-To, and no route to honour
		// (its own redirect would replace those fields).
		m, rerr := upstreams.Redirect(&upstreams.Message{ID: env.ID, From: env.From, To: rcpts, Body: body}, redirect)
		if rerr != nil {
			return &smtp.SMTPError{Code: 554, Message: fmt.Sprintf("redirecting (route %s): %v", route, rerr)}
		}
		msg, rcpts = m.Body, m.To
		extra = fmt.Sprintf("%s: %d\r\n", hopHeader, hopsInARow(env)+1)
	}
	opts := &smtp.MailOptions{Size: msg.Size() + int64(len(extra))}
	if !isASCII(env.From, rcpts) {
		if !dc.utf8 {
			// Not the connection's fault: a new one would not help.
			return &smtp.SMTPError{Code: 553, Message: "the peer does not offer SMTPUTF8 and the envelope needs it"}
		}
		opts.UTF8 = true
	}
	if err := dc.c.Mail(env.From, opts); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	for _, r := range rcpts {
		if err := dc.c.Rcpt(r, nil); err != nil {
			_ = dc.c.Reset() // nothing was sent
			return fmt.Errorf("RCPT %s: %w", r, err)
		}
	}
	w, err := dc.c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	src := &errreader.Reader{R: io.MultiReader(strings.NewReader(extra), io.NewSectionReader(msg, 0, msg.Size()))}
	if _, err := io.Copy(w, src); err != nil {
		if src.Err != nil {
			// Ending DATA now would hand the peer a truncated message;
			// dropping the connection makes it discard what it got.
			dc.conn.Close()
			return fmt.Errorf("reading the spooled message: %w", src.Err)
		}
		w.Close()
		return fmt.Errorf("DATA: %w", err)
	}
	dc.sentAll = true
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of DATA: %w", err)
	}
	return nil
}

// pendingRcpts is every recipient some route of env still has to deliver
// to, once each.
func pendingRcpts(env *Envelope) []string {
	var out []string
	seen := map[string]bool{}
	for _, rs := range env.Routes {
		for _, r := range rs.Pending {
			if k := strings.ToLower(r); !seen[k] {
				seen[k] = true
				out = append(out, r)
			}
		}
	}
	return out
}

func countPending(envs []*Envelope) int {
	n := 0
	for _, e := range envs {
		if len(pendingRcpts(e)) > 0 {
			n++
		}
	}
	return n
}

func isASCII(from string, rcpts []string) bool {
	for _, s := range append([]string{from}, rcpts...) {
		for i := 0; i < len(s); i++ {
			if s[i] >= 0x80 {
				return false
			}
		}
	}
	return true
}
