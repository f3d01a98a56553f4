package smtp

// RELAYCAR: tests of MailRcptData (pipeline.go).

import (
	"bufio"
	"errors"
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
}

// A connection that ends mid-group is an I/O error, not a reply.
func TestMailRcptData_ConnectionLost(t *testing.T) {
	c, _ := scriptedClient(ehloPipelining, "250 sender ok")
	_, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil)
	var se *SMTPError
	if err == nil || errors.As(err, &se) || errors.Is(err, ErrNoRecipients) {
		t.Fatalf("err = %v, want an I/O error", err)
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

// A 421 and a close mid-group is reported by the 421, with its text.
func TestMailRcptData_ClosingReplyWins(t *testing.T) {
	c, _ := scriptedClient(ehloPipelining, "421 4.7.0 too many messages, slow down")
	_, _, err := c.MailRcptData("a@example.com", nil, []string{"b@example.net"}, nil)
	var se *SMTPError
	if !errors.As(err, &se) || se.Code != 421 || !strings.Contains(se.Message, "slow down") {
		t.Fatalf("err = %v, want the 421", err)
	}
}
