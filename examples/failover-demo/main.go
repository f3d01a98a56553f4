// Command failover-demo shows relaycar failing over between two SMTP
// upstreams on a laptop, with no cloud account:
//
//	go run ./examples/failover-demo
//
// It builds relaycar, starts two local SMTP sinks ("primary" and "backup")
// and the relay in front of them, and sends a message every 250 ms. After
// 3 s the primary goes down: messages fail over to the backup and the
// primary's circuit breaker opens. After 8 s it comes back: the breaker
// half-opens, closes, and traffic returns to the primary. At the end it
// checks that every accepted message was delivered exactly once.
// Everything binds 127.0.0.1 and stops by itself within about 20 s.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"
)

const (
	messages = 60
	interval = 250 * time.Millisecond
	downAt   = 3 * time.Second
	upAt     = 8 * time.Second
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "failover-demo:", err)
		os.Exit(1)
	}
}

func run() error {
	dir, err := os.MkdirTemp("", "relaycar-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	fmt.Println("building relaycar ...")
	bin := filepath.Join(dir, "relaycar")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/relaycar").CombinedOutput(); err != nil {
		return fmt.Errorf("go build (run this from the repository root): %v\n%s", err, out)
	}

	start := time.Now()
	primary, err := newSink("primary", start)
	if err != nil {
		return err
	}
	backup, err := newSink("backup", start)
	if err != nil {
		return err
	}
	defer primary.stop()
	defer backup.stop()

	smtpAddr, adminAddr := freeAddr(), freeAddr()
	cfg := fmt.Sprintf(`listen: {address: %s}
admin: {address: %s}
spool:
  dir: %s
  retry: {initial: 1s, max: 2s, multiplier: 2}
shutdown: {grace: 5s}
upstreams:
  - name: primary
    type: smtp
    address: %s
    tls: none
    timeout: 2s
    circuit_breaker: {failures: 2, open_for: 3s}
  - name: backup
    type: smtp
    address: %s
    tls: none
routes:
  - name: default
    upstreams: [primary, backup]
    strategy: failover
`, smtpAddr, adminAddr, filepath.Join(dir, "spool"), primary.addr, backup.addr)
	cfgPath := filepath.Join(dir, "relay.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	fmt.Printf("relay.yaml:\n%s\n", indent(cfg))

	relay := exec.Command(bin, "serve", "--config", cfgPath, "--log-format", "json")
	stderr, _ := relay.StderrPipe()
	if err := relay.Start(); err != nil {
		return err
	}
	defer func() {
		relay.Process.Signal(syscall.SIGTERM)
		relay.Wait()
	}()
	go echoRelayLog(stderr, start)
	if err := waitReady(adminAddr); err != nil {
		return err
	}
	fmt.Printf("relaycar is ready on %s; sending %d messages, one every %s\n\n", smtpAddr, messages, interval)

	var accepted []string
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	downDone, upDone := false, false
	for i := 1; i <= messages; i++ {
		<-ticker.C
		el := time.Since(start)
		if !downDone && el >= downAt {
			fmt.Printf("%6s  *** primary goes DOWN ***\n", stamp(start))
			primary.stop()
			downDone = true
		}
		if !upDone && el >= upAt {
			fmt.Printf("%6s  *** primary comes BACK ***\n", stamp(start))
			if err := primary.restart(); err != nil {
				return err
			}
			upDone = true
		}
		subject := fmt.Sprintf("demo message %02d", i)
		if err := send(smtpAddr, subject); err != nil {
			fmt.Printf("%6s  %s: not accepted: %v\n", stamp(start), subject, err)
			continue
		}
		accepted = append(accepted, subject)
	}

	// Let the spool drain.
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && primary.count()+backup.count() < len(accepted) {
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("\naccepted %d, delivered via primary %d, via backup %d\n", len(accepted), primary.count(), backup.count())
	fmt.Printf("breaker state now: %s\n", metric(adminAddr, `relaycar_upstream_breaker_state{upstream="primary"}`))
	seen := map[string]int{}
	for _, s := range append(primary.subjects(), backup.subjects()...) {
		seen[s]++
	}
	lost, dup := 0, 0
	for _, s := range accepted {
		switch seen[s] {
		case 0:
			lost++
		case 1:
		default:
			dup++
		}
	}
	fmt.Printf("lost: %d, delivered twice: %d\n", lost, dup)
	if lost > 0 {
		return fmt.Errorf("%d accepted messages were not delivered", lost)
	}
	return nil
}

// sink is a local SMTP server that prints each message it receives.
type sink struct {
	name, addr string
	start      time.Time
	mu         sync.Mutex
	srv        *smtp.Server
	got        []string
}

func newSink(name string, start time.Time) (*sink, error) {
	s := &sink{name: name, start: start}
	return s, s.listen("127.0.0.1:0")
}

func (s *sink) listen(addr string) error {
	var ln net.Listener
	var err error
	for range 50 { // the port can linger briefly after a restart
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{s: s}, nil }))
	srv.Domain = s.name + ".local"
	srv.ErrorLog = quiet{}
	s.mu.Lock()
	s.srv, s.addr = srv, ln.Addr().String()
	s.mu.Unlock()
	go srv.Serve(ln)
	return nil
}

func (s *sink) stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

func (s *sink) restart() error { return s.listen(s.addr) }

func (s *sink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

func (s *sink) subjects() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.got...)
}

type sinkSession struct {
	s       *sink
	subject string
}

func (ss *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (ss *sinkSession) Data(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Subject: "); ok {
			ss.subject = v
		}
	}
	ss.s.mu.Lock()
	ss.s.got = append(ss.s.got, ss.subject)
	ss.s.mu.Unlock()
	fmt.Printf("%6s  %-16s -> %s\n", stamp(ss.s.start), ss.subject, ss.s.name)
	return nil
}
func (ss *sinkSession) Reset()        {}
func (ss *sinkSession) Logout() error { return nil }

type quiet struct{}

func (quiet) Printf(string, ...any) {}
func (quiet) Println(...any)        {}

func send(addr, subject string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	msg := fmt.Sprintf("From: app@example.com\r\nTo: ops@example.com\r\nSubject: %s\r\n\r\nhello\r\n", subject)
	return c.SendMail("app@example.com", []string{"ops@example.com"}, strings.NewReader(msg))
}

// echoRelayLog prints the relay's breaker and failure events, which tell
// the story, as short human lines; per-message lines are printed by the
// sinks. The relay logs JSON (see --log-format above), so the demo reads
// the fixed event name and its attributes instead of matching text.
func echoRelayLog(r io.Reader, start time.Time) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			// Not a log event (a crash, say): show it as it is.
			fmt.Printf("%6s  relaycar: %s\n", stamp(start), sc.Text())
			continue
		}
		if line := describe(ev); line != "" {
			fmt.Printf("%6s  relaycar: %s\n", stamp(start), line)
		}
	}
}

// describe turns the events the demo is about into one line each, like
// "circuit breaker open (upstream primary, was closed)"; "" for the rest.
func describe(ev map[string]any) string {
	attr := func(k string) string {
		if v, ok := ev[k]; ok {
			return fmt.Sprint(v)
		}
		return ""
	}
	switch attr("msg") {
	case "circuit breaker state changed":
		of := "upstream " + attr("upstream")
		if d := attr("sender_domain"); d != "" {
			of += ", sender domain " + d
		}
		return fmt.Sprintf("circuit breaker %s (%s, was %s)", attr("state"), of, attr("from"))
	case "delivery attempt failed":
		return fmt.Sprintf("delivery attempt failed (message %s, attempt %s): %s", attr("msg_id"), attr("attempt"), attr("err"))
	}
	return ""
}

func waitReady(addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		if resp, err := http.Get("http://" + addr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("relaycar did not become ready")
}

func metric(addr, series string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return "?"
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return map[string]string{"0": "closed", "1": "half-open", "2": "open"}[v]
		}
	}
	return "?"
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func stamp(start time.Time) string { return fmt.Sprintf("%.1fs", time.Since(start).Seconds()) }

func indent(s string) string {
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ")
}
