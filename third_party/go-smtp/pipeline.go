package smtp

import (
	"errors"
	"time"
)

// RELAYCAR: not in go-smtp v0.26.0.

// ErrNoRecipients is MailRcptData's error when the server refused every
// recipient: the per-recipient replies say why.
var ErrNoRecipients = errors.New("smtp: every recipient was refused")

// MailRcptData starts a transaction: MAIL FROM, one RCPT TO per
// recipient, DATA. Where the server advertises PIPELINING (RFC 2920) the
// commands go out in one write and their replies are read after it, so a
// message costs two round trips (this one and the end of its data)
// instead of three plus one per recipient; elsewhere they are sent one by
// one, as Mail, Rcpt and Data would.
//
// err is MAIL's reply or an I/O error (then no transaction started), or
// ErrNoRecipients, or DATA's reply. rcptErrs[i] is the reply to
// recipient i, nil if accepted; it is set whenever MAIL was accepted. On
// success the caller writes the message to the DataCommand and closes it.
//
// A server that answers 354 to a pipelined DATA although it accepted no
// recipient (RFC 2920 says it must not) gets an empty message, ended at
// once, so that the connection stays usable.
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

	c.conn.SetDeadline(time.Now().Add(c.CommandTimeout))
	defer c.conn.SetDeadline(time.Time{})
	id := c.text.Next()
	c.text.StartRequest(id)
	for _, l := range lines {
		c.text.W.WriteString(l)
		c.text.W.WriteString("\r\n")
	}
	err = c.text.W.Flush()
	c.text.EndRequest(id)
	if err != nil {
		return nil, nil, err
	}
	c.text.StartResponse(id)
	defer c.text.EndResponse(id)

	// Every reply is read, whatever an earlier one said, or the next
	// command would read this one's leftovers. A server that gives up
	// mid-group (a 421, then it closes) is reported by that reply, not by
	// the read that found the connection closed.
	var closing error
	lost := func(ioErr error) ([]error, *DataCommand, error) {
		if closing != nil {
			return nil, nil, closing
		}
		return nil, nil, ioErr
	}
	reply := func(expect int) error {
		_, _, e := c.readResponse(expect)
		var se *SMTPError
		if errors.As(e, &se) && se.Code == 421 && closing == nil {
			closing = e
		}
		return e
	}
	mailErr := reply(250)
	if mailErr != nil && !isSMTPError(mailErr) {
		return lost(mailErr)
	}
	c.rcpts = nil
	rcptErrs = make([]error, len(to))
	for i, rcpt := range to {
		e := reply(25)
		if e != nil && !isSMTPError(e) {
			return lost(e)
		}
		rcptErrs[i] = e
		if e == nil && mailErr == nil {
			c.rcpts = append(c.rcpts, rcpt)
		}
	}
	dataErr := reply(354)
	if dataErr != nil && !isSMTPError(dataErr) {
		return lost(dataErr)
	}
	if dataErr == nil && (mailErr != nil || len(c.rcpts) == 0) {
		// 354 without a transaction to carry: end the data at once and
		// ignore what the server makes of an empty message.
		c.text.W.WriteString(".\r\n")
		if err := c.text.W.Flush(); err != nil {
			return nil, nil, err
		}
		if _, _, err := c.readResponse(250); err != nil && !isSMTPError(err) {
			return nil, nil, err
		}
	}
	switch {
	case mailErr != nil:
		return nil, nil, mailErr
	case len(c.rcpts) == 0:
		return rcptErrs, nil, ErrNoRecipients
	case dataErr != nil:
		return rcptErrs, nil, dataErr
	}
	return rcptErrs, &DataCommand{client: c, wc: &dotWriter{w: c.text.W}}, nil
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
			return nil, nil, err
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
