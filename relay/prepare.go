package relay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"

	"github.com/relaycar/relaycar/internal/mailhdr"
)

// prepared is an accepted message as every upstream will receive it.
type prepared struct {
	data      []byte
	messageID string
	header    textproto.Header // after X-Relay-* removal: what upstreams get
	relayHdrs textproto.Header // the removed X-Relay-* fields
	drainHops int              // from the removed hop header (drain.go)
}

// receivedInfo describes the SMTP session: for the Received trace header,
// and whether the client may steer routing with X-Relay-* headers
// (listen.trusted_networks).
type receivedInfo struct {
	helo, remote, hostname, id, with string
	at                               time.Time
	trusted                          bool
}

// routingHeader is the header routes match on (match.headers): the
// delivered header plus, from a trusted client, the removed X-Relay-*
// fields. From an untrusted client an X-Relay-* name reads as absent.
func (p *prepared) routingHeader(trusted bool) func(string) string {
	return func(name string) string {
		if isRelayHeader(name) {
			if !trusted {
				return ""
			}
			return p.relayHdrs.Get(name)
		}
		return p.header.Get(name)
	}
}

func isRelayHeader(name string) bool {
	return strings.HasPrefix(strings.ToLower(name), "x-relay-")
}

// prepare removes X-Relay-* headers (keeping them for routing) and the
// drain hop count,
// adds a Message-ID when missing, so every attempt and every provider sees
// the same one, and prepends one Received header. The body and all other
// header bytes are unchanged; see mailhdr.Split for where the header ends.
func prepare(raw []byte, ri receivedInfo) (*prepared, error) {
	hdr, bodyOff := mailhdr.Split(raw)
	// A buffer the size of a small header, not bufio's 4 KiB per message.
	h, err := textproto.ReadHeader(bufio.NewReaderSize(bytes.NewReader(hdr), min(len(hdr)+16, 4096)))
	if err != nil && !errors.Is(err, io.EOF) {
		// mailhdr.Split only passes well-formed field lines; keep them as
		// body rather than lose them if the parser still disagrees.
		h, bodyOff = textproto.Header{}, 0
	}
	p := &prepared{}
	for f := h.Fields(); f.Next(); {
		switch {
		case isRelayHeader(f.Key()):
			p.relayHdrs.Add(f.Key(), f.Value())
			f.Del()
		case strings.EqualFold(f.Key(), hopHeader):
			p.drainHops = max(p.drainHops, drainHops(f.Value()))
			f.Del()
		}
	}
	p.messageID = strings.TrimSpace(h.Get("Message-Id"))
	if p.messageID == "" {
		p.messageID = fmt.Sprintf("<%s@%s>", ri.id, ri.hostname)
		h.Add("Message-Id", p.messageID)
	}
	h.AddRaw([]byte(receivedHeader(ri)))
	var out bytes.Buffer
	out.Grow(len(raw) + 512)
	if err := textproto.WriteHeader(&out, h); err != nil {
		return nil, err
	}
	out.Write(raw[bodyOff:])
	p.data = out.Bytes()
	p.header = h
	return p, nil
}

// isFieldLine reports "Name: value" (see mailhdr.IsFieldLine).
func isFieldLine(line []byte) bool { return mailhdr.IsFieldLine(line) }

func receivedHeader(ri receivedInfo) string {
	// Folded at 78 columns is not required (998 max) but keeps it readable.
	return fmt.Sprintf("Received: from %s ([%s])\r\n\tby %s (relaycar) with %s id %s;\r\n\t%s\r\n",
		sanitize(ri.helo), ri.remote, ri.hostname, ri.with, ri.id, ri.at.Format(time.RFC1123Z))
}

// sanitize keeps a client-supplied HELO name from breaking the header.
func sanitize(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x21 || r > 0x7e || r == '(' || r == ')' {
			return -1
		}
		return r
	}, s)
	if s == "" {
		return "unknown"
	}
	return s
}
