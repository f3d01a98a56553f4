// Command spoolfixture makes relay/spool/testdata/v1: a spool written by a
// v1 relaycar binary (the .eml + .json format), in every state the v2
// spool must carry over. Run it through tools/make-spool-fixture.sh, which
// builds that binary.
//
// It runs the binary against a local SMTP sink that accepts ok@, answers
// 451 to later@ and 550 to reject@, submits messages over SMTP, waits for
// each state on disk, stops the relay with SIGTERM and copies the spool.
package main

import (
	"github.com/relaycar/relaycar/relay/spool"

	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"
)

func main() {
	bin := flag.String("relaycar", "", "v1 relaycar binary")
	out := flag.String("out", "relay/spool/testdata/v1", "fixture directory (replaced)")
	flag.Parse()
	if *bin == "" {
		log.Fatal("-relaycar is required")
	}
	if err := run(*bin, *out); err != nil {
		log.Fatal(err)
	}
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

const config = `# written by tools/spoolfixture
listen: {address: "127.0.0.1:%d", hostname: relaycar.fixture}
admin: {address: "127.0.0.1:%d"}
spool:
  dir: ./spool
  max_age: 48h
  retry: {initial: 1h, max: 1h, multiplier: 2}   # no second attempt while the fixture is made
  workers: 2
shutdown_grace: 1s
upstreams:
  - {name: sink, type: smtp, address: "127.0.0.1:%d", tls: none, timeout: 5s}
routes:
  - {name: partners, match: {recipient_domains: [partner.example]}, upstreams: [sink]}
  - {name: default, upstreams: [sink]}
`

func run(bin, out string) error {
	work, err := os.MkdirTemp("", "spoolfixture-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	smtpPort, adminPort, sinkPort := freePort(), freePort(), freePort()
	cfg := filepath.Join(work, "relay.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, config, smtpPort, adminPort, sinkPort), 0o600); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(work, "relay.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	relay := exec.Command(bin, "serve", "--config", cfg)
	relay.Dir, relay.Stdout, relay.Stderr = work, logf, logf
	if err := relay.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- relay.Wait() }()
	defer func() {
		if relay.ProcessState == nil {
			relay.Process.Kill()
		}
	}()
	fail := func(err error) error {
		b, _ := os.ReadFile(filepath.Join(work, "relay.log"))
		return fmt.Errorf("%w\nrelay log:\n%s", err, b)
	}
	relayAddr := fmt.Sprintf("127.0.0.1:%d", smtpPort)
	if err := waitFor("relay listening", func() bool {
		c, err := net.Dial("tcp", relayAddr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		return fail(err)
	}
	spool := filepath.Join(work, "spool")

	// 1. The upstream is down: two messages stay queued after their first
	// attempt.
	for i := 1; i <= 2; i++ {
		if err := submit(relayAddr, fmt.Sprintf("queued-%d", i), "ok@example.net"); err != nil {
			return fail(err)
		}
	}
	if err := waitFor("two queued messages with a failed attempt", func() bool {
		return count(spool, func(e envelope) bool { return e.Attempts == 1 && strings.Contains(e.LastError, "connect") }) == 2
	}); err != nil {
		return fail(err)
	}

	// 2. The upstream is back.
	sink, err := startSink(fmt.Sprintf("127.0.0.1:%d", sinkPort))
	if err != nil {
		return fail(err)
	}
	defer sink.Close()
	// One recipient delivered, one refused with 451: partially delivered.
	if err := submit(relayAddr, "partial", "ok@example.net", "later@example.net"); err != nil {
		return fail(err)
	}
	// Split across two routes: delivered on one, 451 on the other.
	if err := submit(relayAddr, "split", "ok@example.net", "later@partner.example"); err != nil {
		return fail(err)
	}
	// 550: dead-lettered.
	if err := submit(relayAddr, "dead", "reject@example.net"); err != nil {
		return fail(err)
	}
	if err := waitFor("partial deliveries and a dead letter", func() bool {
		partial := count(spool, func(e envelope) bool { return len(e.Deliveries) == 1 && e.Attempts == 1 })
		dead := count(filepath.Join(spool, "dead"), func(e envelope) bool { return e.DeadReason != "" })
		return partial == 2 && dead == 1
	}); err != nil {
		return fail(err)
	}

	// 3. Stop the relay as Kubernetes does and keep what it left.
	relay.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			return fail(fmt.Errorf("relay exit: %w", err))
		}
	case <-time.After(15 * time.Second):
		relay.Process.Kill()
		return fail(errors.New("relay did not stop on SIGTERM"))
	}
	if err := os.RemoveAll(out); err != nil {
		return err
	}
	return copyDir(spool, out)
}

// submit sends one message as a legacy app would; id names it in the
// Subject and Message-ID.
func submit(addr, id string, rcpts ...string) error {
	msg := fmt.Sprintf("From: app@example.com\r\nTo: %s\r\nSubject: fixture %s\r\n"+
		"Date: Sun, 01 Mar 2026 12:00:00 +0000\r\nMessage-ID: <fixture-%s@example.com>\r\n\r\n"+
		"Body of the %s message.\r\n", strings.Join(rcpts, ", "), id, id, id)
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SendMail("app@example.com", rcpts, strings.NewReader(msg)); err != nil {
		return fmt.Errorf("submitting %s: %w", id, err)
	}
	return c.Quit()
}

// envelope is the part of a v1 .json the generator waits on.
type envelope struct {
	Attempts   int               `json:"attempts"`
	LastError  string            `json:"last_error"`
	Deliveries []json.RawMessage `json:"deliveries"`
	DeadReason string            `json:"dead_reason"`
}

// count counts the envelopes in dir that ok accepts: v1's .json files,
// or, for a release with the v2 format, its .msg files read through the
// spool package (read-only; the relay holds the lock).
func count(dir string, ok func(envelope) bool) int {
	files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	if len(files) == 0 {
		return countV2(dir, ok)
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		var e envelope
		if err == nil && json.Unmarshal(b, &e) == nil && ok(e) {
			n++
		}
	}
	return n
}

func waitFor(what string, ok func() bool) error {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if ok() {
			return nil
		}
	}
	return fmt.Errorf("timed out waiting for %s", what)
}

// copyDir copies the spool; file modes are not kept (git stores 0644).
func copyDir(from, to string) error {
	return filepath.Walk(from, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		dst := filepath.Join(to, rel)
		if fi.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
}

// The sink: ok@ accepted, later@ 451, reject@ 550.
type sinkBackend struct{}

func startSink(addr string) (*smtp.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := smtp.NewServer(sinkBackend{})
	srv.Domain = "sink.fixture"
	srv.ErrorLog = log.New(io.Discard, "", 0)
	go srv.Serve(ln)
	return srv, nil
}

func (sinkBackend) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{}, nil }

type sinkSession struct{}

func (*sinkSession) Mail(string, *smtp.MailOptions) error { return nil }

func (*sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	switch {
	case strings.HasPrefix(to, "later@"):
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "mailbox busy, try later"}
	case strings.HasPrefix(to, "reject@"):
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	return nil
}

func (*sinkSession) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

func (*sinkSession) Reset()        {}
func (*sinkSession) Logout() error { return nil }

func countV2(dir string, ok func(envelope) bool) int {
	root, list := dir, (*spool.Spool).List
	if filepath.Base(dir) == "dead" {
		root, list = filepath.Dir(dir), (*spool.Spool).Dead
	}
	if _, err := os.Stat(root); err != nil {
		return 0
	}
	sp, err := spool.Open(root, spool.Options{})
	if err != nil {
		return 0
	}
	envs, _ := list(sp)
	n := 0
	for _, e := range envs {
		b, _ := json.Marshal(e)
		var v envelope
		if json.Unmarshal(b, &v) == nil && ok(v) {
			n++
		}
	}
	return n
}
