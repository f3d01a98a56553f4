package smtp

import (
	"errors"
	"time"
)

// RELAYCAR: not in go-smtp v0.26.0.

// ErrNoRecipients is MailRcptData's error when the server refused every
// recipient: the per-recipient replies say why.
var ErrNoRecipients = errors.New("smtp: every recipient was refused")

// maxPipelined bounds the commands written before their replies are read:
// RFC 2920 warns that a client which only writes can deadlock with a
// server whose replies fill the socket buffers.
const maxPipelined = 100

// MailRcptData starts a transaction: MAIL FROM, one RCPT TO per
// recipient, DATA. Where the server advertises PIPELINING (RFC 2920) the
// commands go out in one write (per 100) and their replies are read
// after it, so a message costs two round trips (this one and the end of
// its data) instead of three plus one per recipient; elsewhere they are
// sent one by one, as Mail, Rcpt and Data would.
//
// rcptErrs is nil when MAIL was refused (err is its reply) or its reply
// could not be read (err is the I/O error): no transaction started.
// Otherwise rcptErrs[i] is recipient i's reply, nil if accepted, or, from
// the first reply that could not be read on, that I/O error; err is then
// ErrNoRecipients if no recipient was accepted, else DATA's reply or I/O
// error. On success the caller writes the message to the DataCommand and
// closes it. After an I/O error the connection is out of step.
//
// A server that answers 354 to a pipelined DATA although it accepted no
// recipient (RFC 2920 says it must not) gets an empty message, ended at
// once.
func (c *Client) MailRcptData(from string, opts *MailOptions, to []string, rcptOpts *RcptOptions) (rcptErrs []error, dc *DataCommand, err error) {
	if err := c.hello(); err != nil {
		return nil, nil, err
	}
	if _, ok := c.ext["PIPELINING"]; !ok || c.lmtp {
		return c.mailRcptDataInTurn(from, opts, to, rcptOpts)
	}
	mail, err := c.mailLine(from, opts)
	if err != nil {
		return nil, nil, err
	}
	lines := make([]string, 0, len(to)+2)
	lines = append(lines, mail)
	for _, rcpt := range to {
		l, err := c.rcptLine(rcpt, rcptOpts)
		if err != nil {
			return nil, nil, err
		}
		lines = append(lines, l)
	}
	lines = append(lines, "DATA")
	defer c.conn.SetDeadline(time.Time{})

	// Replies in order: MAIL's, one per recipient, DATA's. Every reply is
	// read whatever an earlier one said, or the next command would read
	// this one's leftovers.
	var mailErr, dataErr error
	accepted := 0
	for start := 0; start < len(lines); start += maxPipelined {
		group := lines[start:min(start+maxPipelined, len(lines))]
		if err := c.sendGroup(group); err != nil {
			return lostAt(start, len(to), accepted, rcptErrs, mailErr, err)
		}
		for k := range group {
			i := start + k
			expect := 25
			switch i {
			case 0:
				expect = 250
			case len(lines) - 1:
				expect = 354
			}
			c.conn.SetDeadline(time.Now().Add(c.CommandTimeout))
			_, _, e := c.readResponse(expect)
			if e != nil && !isSMTPError(e) {
				return lostAt(i, len(to), accepted, rcptErrs, mailErr, e)
			}
			switch {
			case i == 0:
				mailErr = e
				if mailErr == nil {
					c.rcpts = nil
					rcptErrs = make([]error, len(to))
				}
			case i == len(lines)-1:
				dataErr = e
			case mailErr == nil:
				rcptErrs[i-1] = e
				if e == nil {
					accepted++
					c.rcpts = append(c.rcpts, to[i-1])
				}
			}
		}
	}
	if dataErr == nil && (mailErr != nil || accepted == 0) {
		// 354 without a transaction to carry: end the data at once. What
		// the server makes of an empty message does not matter, and the
		// caller is told of the refusal either way.
		c.conn.SetDeadline(time.Now().Add(c.CommandTimeout))
		c.text.W.WriteString(".\r\n")
		if c.text.W.Flush() == nil {
			c.readResponse(250)
		}
	}
	switch {
	case mailErr != nil:
		return nil, nil, mailErr
	case accepted == 0:
		return rcptErrs, nil, ErrNoRecipients
	case dataErr != nil:
		return rcptErrs, nil, dataErr
	}
	return rcptErrs, &DataCommand{client: c, wc: &dotWriter{w: c.text.W}}, nil
}

// sendGroup writes commands with one flush. It takes its turn in
// textproto's request and response sequence as go-smtp's cmd does; the
// replies are read after it, as nothing else uses the connection meanwhile.
func (c *Client) sendGroup(lines []string) error {
	c.conn.SetDeadline(time.Now().Add(c.CommandTimeout))
	id := c.text.Next()
	c.text.StartRequest(id)
	for _, l := range lines {
		c.text.W.WriteString(l)
		c.text.W.WriteString("\r\n")
	}
	err := c.text.W.Flush()
	c.text.EndRequest(id)
	c.text.StartResponse(id)
	c.text.EndResponse(id)
	return err
}

// lostAt is MailRcptData's result when the connection failed at command
// i (0 MAIL, then the n recipients, then DATA) with ioErr.
func lostAt(i, n, accepted int, rcptErrs []error, mailErr, ioErr error) ([]error, *DataCommand, error) {
	switch {
	case i == 0:
		return nil, nil, ioErr
	case mailErr != nil:
		// MAIL's refusal is the news; the server may well have hung up
		// after it.
		return nil, nil, mailErr
	case i <= n:
		// At a recipient: it and those after it were never answered.
		failFrom(rcptErrs, i-1, ioErr)
		return rcptErrs, nil, ioErr
	case accepted == 0:
		return rcptErrs, nil, ErrNoRecipients
	}
	return rcptErrs, nil, ioErr
}

// failFrom sets rcptErrs[i:] to err: replies that never came.
func failFrom(rcptErrs []error, i int, err error) {
	for j := i; j < len(rcptErrs); j++ {
		rcptErrs[j] = err
	}
}

// mailRcptDataInTurn is MailRcptData for a server without PIPELINING.
func (c *Client) mailRcptDataInTurn(from string, opts *MailOptions, to []string, rcptOpts *RcptOptions) ([]error, *DataCommand, error) {
	if err := c.Mail(from, opts); err != nil {
		return nil, nil, err
	}
	rcptErrs := make([]error, len(to))
	accepted := 0
	for i, rcpt := range to {
		err := c.Rcpt(rcpt, rcptOpts)
		if err != nil && !isSMTPError(err) {
			failFrom(rcptErrs, i, err)
			return rcptErrs, nil, err
		}
		rcptErrs[i] = err
		if err == nil {
			accepted++
		}
	}
	if accepted == 0 {
		return rcptErrs, nil, ErrNoRecipients
	}
	dc, err := c.Data()
	if err != nil {
		return rcptErrs, nil, err
	}
	return rcptErrs, dc, nil
}

func isSMTPError(err error) bool {
	var se *SMTPError
	return errors.As(err, &se)
}
