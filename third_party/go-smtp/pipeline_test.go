package smtp

// RELAYCAR: tests of MailRcptData (pipeline.go).

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/textproto"
	"strings"
	"testing"
)

// writeLog is a faker's writer that keeps each Write apart: a flush of
// the client's buffer is one Write.
type writeLog struct{ writes []string }

func (w *writeLog) Write(p []byte) (int, error) {
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

func (w *writeLog) all() string { return strings.Join(w.writes, "") }

// scriptedClient is a Client whose server sends script (lines joined
// with CRLF) and whose writes are logged.
func scriptedClient(script ...string) (*Client, *writeLog) {
	log := &writeLog{}
	server := "220 localhost ESMTP\r\n" + strings.Join(script, "\r\n") + "\r\n"
	fake := faker{ReadWriter: struct {
		io.Reader
		io.Writer
	}{bufio.NewReader(strings.NewReader(server)), log}}
	return &Client{text: textproto.NewConn(fake), conn: fake, localName: "localhost"}, log
}

const ehloPipelining = "250-localhost\r\n250-PIPELINING\r\n250 8BITMIME"

func TestMailRcptData_PipelinedInOneWrite(t *testing.T) {
	c, log := scriptedClient(ehloPipelining,
		"250 sender ok", "250 b ok", "550 5.1.1 no such user", "250 d ok", "354 go ahead", "250 2.0.0 queued as X")
	rcptErrs, dc, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net", "c@example.net", "d@example.net"}, nil)
	if err != nil {
		t.Fatalf("MailRcptData: %v", err)
	}
	want := "MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n"
	if len(log.writes) != 2 || log.writes[1] != want {
		t.Fatalf("writes %q, want EHLO then %q in one write", log.writes, want)
	}
	var se *SMTPError
	if rcptErrs[0] != nil || rcptErrs[2] != nil || !errors.As(rcptErrs[1], &se) || se.Code != 550 {
		t.Fatalf("rcptErrs = %v, want only c@ refused with 550", rcptErrs)
	}
	if strings.Join(c.rcpts, ",") != "b@example.net,d@example.net" {
		t.Errorf("c.rcpts = %v", c.rcpts)
	}
	if _, err := io.WriteString(dc, "Subject: x\r\n\r\nbody\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := dc.CloseWithResponse()
	if err != nil || resp.StatusText != "2.0.0 queued as X" {
		t.Fatalf("end of data: %v, %v", resp, err)
	}
	if !strings.HasSuffix(log.all(), "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n") {
		t.Errorf("sent %q", log.all())
	}
}

// Every reply of the group is read whatever an earlier one said, so the
// next command reads its own reply.
func TestMailRcptData_RefusalsKeepTheConnectionInStep(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replies []string
		wantErr func(error) bool
		dot     bool // the client must end an empty message
	}{
		{"MAIL refused", []string{"451 4.3.0 try later", "503 5.5.1 no MAIL", "503 5.5.1 no valid recipients"},
			func(err error) bool { var se *SMTPError; return errors.As(err, &se) && se.Code == 451 }, false},
		{"every RCPT refused, DATA 554", []string{"250 ok", "550 5.1.1 no", "554 5.5.1 no valid recipients"},
			func(err error) bool { return errors.Is(err, ErrNoRecipients) }, false},
		{"every RCPT refused, DATA 354 anyway", []string{"250 ok", "550 5.1.1 no", "354 go ahead", "554 5.6.0 empty message"},
			func(err error) bool { return errors.Is(err, ErrNoRecipients) }, true},
		{"MAIL refused, DATA 354 anyway", []string{"550 5.7.1 sender refused", "503 5.5.1 no MAIL", "354 go ahead", "503 5.5.1 no MAIL"},
			func(err error) bool { var se *SMTPError; return errors.As(err, &se) && se.Code == 550 }, true},
		{"DATA refused", []string{"250 ok", "250 ok", "452 4.3.1 out of space"},
			func(err error) bool { var se *SMTPError; return errors.As(err, &se) && se.Code == 452 }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := append([]string{ehloPipelining}, tc.replies...)
			script = append(script, "250 2.0.0 reset")
			c, log := scriptedClient(script...)
			_, dc, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil)
			if dc != nil || !tc.wantErr(err) {
				t.Fatalf("dc %v, err %v", dc, err)
			}
			if got := strings.HasSuffix(log.all(), "DATA\r\n.\r\n"); got != tc.dot {
				t.Errorf("empty message ended: %v, want %v (sent %q)", got, tc.dot, log.all())
			}
			if err := c.Reset(); err != nil {
				t.Errorf("RSET after the group read another reply: %v", err)
			}
		})
	}
}

func TestMailRcptData_WithoutPipeliningInTurn(t *testing.T) {
	c, log := scriptedClient("250-localhost\r\n250 8BITMIME",
		"250 sender ok", "550 5.1.1 no", "250 ok", "354 go ahead", "250 queued")
	rcptErrs, dc, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net", "c@example.net"}, nil)
	if err != nil || rcptErrs[0] == nil || rcptErrs[1] != nil {
		t.Fatalf("rcptErrs %v, err %v", rcptErrs, err)
	}
	want := []string{"EHLO localhost\r\n", "MAIL FROM:<a@example.com> BODY=8BITMIME\r\n", "RCPT TO:<b@example.net>\r\n", "RCPT TO:<c@example.net>\r\n", "DATA\r\n"}
	if strings.Join(log.writes, "|") != strings.Join(want, "|") {
		t.Errorf("writes %q, want %q", log.writes, want)
	}
	if err := dc.Close(); err != nil {
		t.Fatal(err)
	}

	c, _ = scriptedClient("250-localhost\r\n250 8BITMIME", "250 sender ok", "550 5.1.1 no")
	if _, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil); !errors.Is(err, ErrNoRecipients) {
		t.Errorf("every recipient refused: %v", err)
	}

	// Lost after MAIL: the I/O error stands for the replies not read.
	c, _ = scriptedClient("250-localhost\r\n250 8BITMIME", "250 sender ok", "250 ok")
	rcptErrs, _, err = c.MailRcptData("a@example.com", nil, []string{"b@example.net", "c@example.net"}, nil)
	var se *SMTPError
	if err == nil || errors.As(err, &se) || rcptErrs[0] != nil || rcptErrs[1] == nil || errors.As(rcptErrs[1], &se) {
		t.Errorf("lost at the second RCPT: rcptErrs %v, err %v", rcptErrs, err)
	}
}

// A connection that ends mid-group: before MAIL's reply nothing started
// (rcptErrs nil); after it, the I/O error stands for every reply not read.
func TestMailRcptData_ConnectionLost(t *testing.T) {
	ioErr := func(err error) bool {
		var se *SMTPError
		return err != nil && !errors.As(err, &se) && !errors.Is(err, ErrNoRecipients)
	}
	c, _ := scriptedClient(ehloPipelining)
	if rcptErrs, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil); rcptErrs != nil || !ioErr(err) {
		t.Errorf("lost before MAIL's reply: rcptErrs %v, err %v; want nil and an I/O error", rcptErrs, err)
	}
	c, _ = scriptedClient(ehloPipelining, "250 sender ok", "250 ok")
	rcptErrs, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net", "c@example.net", "d@example.net"}, nil)
	if !ioErr(err) || len(rcptErrs) != 3 || rcptErrs[0] != nil || !ioErr(rcptErrs[1]) || !ioErr(rcptErrs[2]) {
		t.Errorf("lost after one RCPT reply: rcptErrs %v, err %v", rcptErrs, err)
	}
}

// A 421 and a close mid-group is reported by the 421, with its text, at
// the command that got it.
func TestMailRcptData_ClosingReply(t *testing.T) {
	c, _ := scriptedClient(ehloPipelining, "421 4.7.0 too many connections")
	_, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil)
	var se *SMTPError
	if !errors.As(err, &se) || se.Code != 421 {
		t.Errorf("421 at MAIL: err = %v, want the 421", err)
	}

	// The only recipient: every recipient refused, the 421 says why.
	c, _ = scriptedClient(ehloPipelining, "250 ok", "421 4.7.0 too many messages, slow down")
	rcptErrs, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil)
	if !errors.Is(err, ErrNoRecipients) || !errors.As(rcptErrs[0], &se) || se.Code != 421 || !strings.Contains(se.Message, "slow down") {
		t.Errorf("421 at the only RCPT: rcptErrs %v, err %v", rcptErrs, err)
	}

	// One accepted before it: the message cannot go, DATA's reply is lost.
	c, _ = scriptedClient(ehloPipelining, "250 ok", "250 ok", "421 4.7.0 closing")
	rcptErrs, _, err = c.MailRcptData("a@example.com", nil, []string{"b@example.net", "c@example.net"}, nil)
	if err == nil || errors.As(err, &se) || rcptErrs[0] != nil || !errors.As(rcptErrs[1], &se) || se.Code != 421 {
		t.Errorf("421 at the second RCPT: rcptErrs %v, err %v", rcptErrs, err)
	}
}

// More than maxPipelined commands go in several writes, each followed by
// its replies, which still land on the right recipients.
func TestMailRcptData_LargeGroupsInPieces(t *testing.T) {
	var to []string
	script := []string{ehloPipelining, "250 sender ok"}
	for i := 0; i < 150; i++ {
		to = append(to, fmt.Sprintf("r%d@example.net", i))
		if i == 120 {
			script = append(script, "550 5.1.1 no")
		} else {
			script = append(script, "250 ok")
		}
	}
	script = append(script, "354 go ahead")
	c, log := scriptedClient(script...)
	rcptErrs, dc, err := c.MailRcptData("a@example.com", nil, to, nil)
	if err != nil || dc == nil {
		t.Fatal(err)
	}
	for i, e := range rcptErrs {
		if (e != nil) != (i == 120) {
			t.Errorf("rcptErrs[%d] = %v", i, e)
		}
	}
	if len(log.writes) != 3 || strings.Count(log.writes[1], "\r\n") != maxPipelined || !strings.HasSuffix(log.writes[2], "DATA\r\n") {
		t.Errorf("%d writes, want EHLO and two groups (%d commands, then the rest and DATA)", len(log.writes), maxPipelined)
	}
}

// Bad input is refused before anything is sent, as by Mail and Rcpt.
func TestMailRcptData_InjectionRefusedBeforeSending(t *testing.T) {
	c, log := scriptedClient(ehloPipelining)
	if _, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net>\r\nDATA"}, nil); err == nil {
		t.Fatal("a recipient with CRLF was sent")
	}
	if len(log.writes) != 1 {
		t.Errorf("writes %q, want only EHLO", log.writes)
	}
}
