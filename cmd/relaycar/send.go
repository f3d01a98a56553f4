package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

func cmdSend(args []string, stdout, stderr io.Writer) int {
	fs, cfgPath := newFlags("send", "send [--to A] [--from A] [--subject S] [--server host:port] [--config F]", stderr)
	to := fs.String("to", "test@example.com", "recipient (comma-separated for several)")
	from := fs.String("from", "relaycar@localhost", "envelope and header sender")
	subject := fs.String("subject", "relaycar test message", "Subject header")
	server := fs.String("server", "", "relay address (default: listen.address of --config, else 127.0.0.1:2525)")
	if done, code := parseFlags(fs, args, stdout); done {
		return code
	}
	addr := *server
	if addr == "" {
		addr = "127.0.0.1:2525"
		if _, err := os.Stat(*cfgPath); err == nil {
			if cfg, ok := loadConfig(*cfgPath, stderr); ok {
				addr = cfg.Listen.Address
			}
		}
	}
	addr = localAddr(addr)
	rcpts := strings.Split(*to, ",")
	now := time.Now()
	msg := fmt.Sprintf("From: %s\r\nTo: %s\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <%d.relaycar-send@localhost>\r\n\r\n"+
		"This is a test message sent by `relaycar send` at %s.\r\n", *from, strings.Join(rcpts, ", "), *subject,
		now.Format(time.RFC1123Z), now.UnixNano(), now.Format(time.RFC3339))
	c, err := smtp.Dial(addr)
	if err != nil {
		fmt.Fprintf(stderr, "relaycar send: %v\n", err)
		return exitRuntime
	}
	defer c.Close()
	if err := c.SendMail(*from, rcpts, strings.NewReader(msg)); err != nil {
		fmt.Fprintf(stderr, "relaycar send: %v\n", err)
		return exitRuntime
	}
	c.Quit()
	fmt.Fprintf(stdout, "sent to %s via %s\n", strings.Join(rcpts, ", "), addr)
	return exitOK
}
