package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/mail"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"gopkg.in/yaml.v3"

	"github.com/relaycar/relaycar/internal/testwait"
	"github.com/relaycar/relaycar/relay/spool"
)

// relaycarBin is the binary built by TestMain: with -race when
// RELAYCAR_TEST_RACE is set (make test sets it). plainBin is the same
// code without -race, for the tests that measure memory: the race
// detector's shadow memory would be most of what they see.
var relaycarBin, plainBin string

// raceReport opens every report of a -race binary.
const raceReport = "WARNING: DATA RACE"

// repoRoot is the module root, one level above this package.
var repoRoot string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("tests: integration tests skipped in -short mode")
		os.Exit(0)
	}
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	var err error
	if repoRoot, err = filepath.Abs(".."); err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	tmp, err := os.MkdirTemp("", "relaycar-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = "/usr/local/go/bin/go" // where the Go toolchain image puts it
	}
	build := func(out string, flags ...string) error {
		args := append(append([]string{"build", "-o", out}, flags...), "./cmd/relaycar")
		cmd := exec.Command(goTool, args...)
		cmd.Dir = repoRoot
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, b)
		}
		return nil
	}
	plainBin = filepath.Join(tmp, "relaycar")
	relaycarBin = plainBin
	if err := build(plainBin); err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	if os.Getenv("RELAYCAR_TEST_RACE") != "" {
		relaycarBin = filepath.Join(tmp, "relaycar-race")
		if err := build(relaycarBin, "-race"); err != nil {
			fmt.Fprintln(os.Stderr, "tests:", err)
			return 1
		}
	}
	return m.Run()
}

// childEnv is the environment of every relaycar child: the test's own,
// minus RELAYCAR_* so a developer's settings cannot change the outcome.
func childEnv(extra ...string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "RELAYCAR_") })
	return append(env, extra...)
}

// freeAddr returns a 127.0.0.1 port that was free a moment ago. The binary
// takes its addresses from relay.yaml and has no way to report a :0 port,
// so the harness picks them up front (and retries start-up on a clash).
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// harness is one relaycar process (and its restarts) on one spool.
type harness struct {
	t       *testing.T
	dir     string // working directory of the process; relay.yaml lives here
	cfgPath string
	spool   string
	smtp    string
	admin   string
	grace   time.Duration
	http    *http.Client
	// wrap, when set, is applied to every exec.Cmd before Start (a
	// memCgroup's wrap puts the process in a cgroup); see withWrap.
	wrap func(*exec.Cmd)
	// args are extra flags for serve (withArgs).
	args []string
	// bin is the binary run: relaycarBin unless withPlainBinary.
	bin string

	mu    sync.Mutex
	lines []string
	proc  *process
}

// process is one run of the binary.
type process struct {
	cmd  *exec.Cmd
	out  *lineWriter
	done chan struct{}
	// state is set when done is closed.
	state *os.ProcessState
	// stopping is set when the test itself ends the process, so cleanup
	// does not report the exit as unexpected.
	stopping bool
}

// harnessOption changes how newHarness starts the binary.
type harnessOption func(*harness)

// withWrap passes every start of the binary through wrap before Start,
// e.g. memCgroup.wrap to run it inside a memory cgroup.
func withWrap(wrap func(*exec.Cmd)) harnessOption { return func(h *harness) { h.wrap = wrap } }

// withArgs adds flags to every `relaycar serve` of the harness.
func withArgs(args ...string) harnessOption { return func(h *harness) { h.args = args } }

// withPlainBinary runs the binary built without -race, for tests that
// measure the process's memory.
func withPlainBinary() harnessOption { return func(h *harness) { h.bin = plainBin } }

// newHarness starts relaycar with cfgYAML, a relay.yaml fragment (usually
// upstreams and routes, plus whatever listen/spool keys a test needs). The
// harness fills in listen.address and admin.address with free 127.0.0.1
// ports, spool.dir (unless given), a fast retry schedule and a short
// shutdown_grace (unless given).
func newHarness(t *testing.T, cfgYAML string, opts ...harnessOption) *harness {
	t.Helper()
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cfgYAML), &cfg); err != nil {
		t.Fatalf("test config: %v", err)
	}
	if cfg == nil {
		cfg = map[string]any{}
	}
	dir := t.TempDir()
	section := func(k string) map[string]any {
		m, _ := cfg[k].(map[string]any)
		if m == nil {
			m = map[string]any{}
			cfg[k] = m
		}
		return m
	}
	spool := section("spool")
	if _, ok := spool["dir"]; !ok {
		spool["dir"] = filepath.Join(dir, "spool")
	}
	if _, ok := spool["retry"]; !ok {
		spool["retry"] = map[string]any{"initial": "200ms", "max": "1s", "multiplier": 2}
	}
	if _, ok := cfg["shutdown_grace"]; !ok {
		cfg["shutdown_grace"] = "2s"
	}
	grace, err := time.ParseDuration(fmt.Sprint(cfg["shutdown_grace"]))
	if err != nil {
		t.Fatalf("test config: shutdown_grace: %v", err)
	}
	spoolDir := fmt.Sprint(spool["dir"])
	if !filepath.IsAbs(spoolDir) {
		spoolDir = filepath.Join(dir, spoolDir)
	}
	h := &harness{t: t, dir: dir, cfgPath: filepath.Join(dir, "relay.yaml"), spool: spoolDir, grace: grace,
		http: &http.Client{Timeout: 5 * time.Second}}
	for _, o := range opts {
		o(h)
	}
	t.Cleanup(h.cleanup)
	// A port picked by freeAddr can be taken by a parallel test before the
	// relay binds it; pick new ones and try again in that case.
	for try := 1; ; try++ {
		h.smtp, h.admin = freeAddr(t), freeAddr(t)
		section("listen")["address"] = h.smtp
		section("admin")["address"] = h.admin
		b, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatalf("test config: %v", err)
		}
		if err := os.WriteFile(h.cfgPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
		err = h.start()
		if err == nil {
			return h
		}
		if try >= 3 || !h.logContains("address already in use") {
			t.Fatalf("relaycar did not start: %v\nrelay.yaml:\n%s", err, b)
		}
		t.Logf("port clash, retrying start-up: %v", err)
	}
}

// newHarnessRaw runs relaycar on a complete relay.yaml text, unchanged, in
// a fresh directory. The caller says where the config puts the listeners
// and the spool (relative to that directory) and what its grace is.
func newHarnessRaw(t *testing.T, text, smtpAddr, adminAddr, spoolDir string, grace time.Duration) *harness {
	t.Helper()
	dir := t.TempDir()
	h := &harness{t: t, dir: dir, cfgPath: filepath.Join(dir, "relay.yaml"), spool: filepath.Join(dir, spoolDir),
		smtp: smtpAddr, admin: adminAddr, grace: grace, http: &http.Client{Timeout: 5 * time.Second}}
	if err := os.WriteFile(h.cfgPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.cleanup)
	if err := h.start(); err != nil {
		t.Fatalf("relaycar did not start: %v", err)
	}
	return h
}

// start runs the binary and waits until GET /readyz answers 200.
func (h *harness) start() error {
	h.t.Helper()
	bin := h.bin
	if bin == "" {
		bin = relaycarBin
	}
	cmd := exec.Command(bin, append([]string{"serve", "--config", h.cfgPath}, h.args...)...)
	cmd.Dir = h.dir
	cmd.Env = childEnv()
	// Never outlive the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if h.wrap != nil {
		h.wrap(cmd)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	p.out = &lineWriter{log: h.logLine}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		return err
	}
	p.out.setPrefix(fmt.Sprintf("relaycar[%d]: ", cmd.Process.Pid))
	go func() {
		cmd.Wait()
		p.out.flush()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	h.mu.Lock()
	h.proc = p
	h.mu.Unlock()

	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-p.done:
			p.stopping = true
			return fmt.Errorf("relaycar exited during start-up: %v", p.state)
		default:
		}
		if code, _ := h.get("/readyz"); code == http.StatusOK {
			return nil
		}
		if time.Now().After(deadline) {
			p.stopping = true
			p.cmd.Process.Kill()
			<-p.done
			return errors.New("GET /readyz did not answer 200 within 10s")
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// cleanup stops the process with SIGTERM and fails the test unless it
// exits 0 within shutdown_grace plus a margin.
func (h *harness) cleanup() {
	p := h.current()
	if p == nil {
		return
	}
	select {
	case <-p.done:
		if !p.stopping {
			h.t.Errorf("relaycar exited on its own during the test: %v", p.state)
		}
		return
	default:
	}
	p.stopping = true
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if code := p.state.ExitCode(); code != 0 {
			h.t.Errorf("relaycar did not stop cleanly: %v", p.state)
		}
	case <-time.After(h.grace + 5*time.Second):
		p.cmd.Process.Kill()
		<-p.done
		h.t.Errorf("relaycar did not stop cleanly: still running %s after SIGTERM; killed", h.grace+5*time.Second)
	}
}

func (h *harness) current() *process {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.proc
}

// sigterm stops the relay the way Kubernetes does and returns its exit code
// and how long it took; it fails the test if the process outlives the grace
// period plus a margin.
func (h *harness) sigterm() (code int, took time.Duration) {
	h.t.Helper()
	p := h.current()
	p.stopping = true
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		h.t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-p.done:
		return p.state.ExitCode(), time.Since(start)
	case <-time.After(h.grace + 5*time.Second):
		p.cmd.Process.Kill()
		<-p.done
		h.t.Fatalf("relaycar did not stop cleanly: still running %s after SIGTERM; killed", h.grace+5*time.Second)
	}
	return -1, 0
}

// kill9 crashes the relay.
func (h *harness) kill9() {
	h.t.Helper()
	p := h.current()
	p.stopping = true
	if err := p.cmd.Process.Kill(); err != nil {
		h.t.Fatalf("SIGKILL: %v", err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		h.t.Fatal("relaycar did not die from SIGKILL within 10s")
	}
}

// restart starts the binary again on the same config and spool; the
// previous process must have been stopped with sigterm or kill9.
func (h *harness) restart() {
	h.t.Helper()
	if p := h.current(); p != nil {
		select {
		case <-p.done:
		default:
			h.t.Fatal("restart: relaycar is still running")
		}
	}
	if err := h.start(); err != nil {
		h.t.Fatalf("relaycar did not restart: %v", err)
	}
}

// logLine records one line of the process's output and passes it to t.Log.
func (h *harness) logLine(line string) {
	h.mu.Lock()
	h.lines = append(h.lines, line)
	h.mu.Unlock()
	h.t.Log(line)
	// A -race binary (RELAYCAR_TEST_RACE) reports here, and at exit only
	// through its status, which a kill -9 test never sees.
	if strings.Contains(line, raceReport) {
		h.t.Errorf("the relaycar binary reported a data race: %s", line)
	}
}

// logContains reports whether any output line so far contains s.
func (h *harness) logContains(s string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.ContainsFunc(h.lines, func(l string) bool { return strings.Contains(l, s) })
}

// lineWriter splits a process's output into lines.
type lineWriter struct {
	mu     sync.Mutex
	prefix string
	buf    []byte
	log    func(string)
}

func (w *lineWriter) setPrefix(p string) {
	w.mu.Lock()
	w.prefix = p
	w.mu.Unlock()
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.log(w.prefix + string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	return len(b), nil
}

func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.log(w.prefix + string(w.buf))
		w.buf = nil
	}
}

// get fetches an admin endpoint; code 0 means it could not be reached.
func (h *harness) get(path string) (int, []byte) {
	resp, err := h.http.Get("http://" + h.admin + path)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// metric returns the sum of the samples of a counter or gauge whose labels
// include all of labels ("name=value" each); 0 when there is none.
func (h *harness) metric(name string, labels ...string) float64 {
	h.t.Helper()
	code, body := h.get("/metrics")
	if code != http.StatusOK {
		h.t.Fatalf("GET /metrics: status %d", code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		h.t.Fatalf("parsing /metrics: %v", err)
	}
	fam := fams[name]
	if fam == nil {
		return 0
	}
	want := map[string]string{}
	for _, l := range labels {
		k, v, _ := strings.Cut(l, "=")
		want[k] = v
	}
	var sum float64
	for _, m := range fam.GetMetric() {
		n := 0
		for _, lp := range m.GetLabel() {
			if v, ok := want[lp.GetName()]; ok && v == lp.GetValue() {
				n++
			}
		}
		if n != len(want) {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum
}

// queueEntry is the part of GET /api/queue and /api/dead the tests read.
type queueEntry struct {
	ID         string `json:"id"`
	Attempts   int    `json:"attempts"`
	LastError  string `json:"last_error"`
	DeadReason string `json:"dead_reason"`
}

func (h *harness) api(path string) []queueEntry {
	h.t.Helper()
	code, body := h.get(path)
	if code != http.StatusOK {
		h.t.Fatalf("GET %s: status %d: %s", path, code, body)
	}
	var out []queueEntry
	if err := json.Unmarshal(body, &out); err != nil {
		h.t.Fatalf("GET %s: %v\n%s", path, err, body)
	}
	return out
}

// spoolIDs lists the live messages on disk: every <spool>/<id>.msg, and
// those committed in a pool file (.free-*), which the spool
// package lists by their contents.
func (h *harness) spoolIDs() []string {
	h.t.Helper()
	return append(h.ids(h.spool), h.placedIDs()...)
}

// placedIDs lists the live messages that are in a pool file (.free-*)
// rather than under their own name, as the spool package finds them by
// their contents.
func (h *harness) placedIDs() []string {
	h.t.Helper()
	named := h.ids(h.spool)
	var ids []string
	sp, err := spool.Open(h.spool, spool.Options{})
	if err != nil {
		h.t.Fatalf("opening %s: %v", h.spool, err)
	}
	envs, err := sp.List()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		h.t.Fatalf("listing %s: %v", h.spool, err)
	}
	for _, e := range envs {
		if !slices.Contains(named, e.ID) {
			ids = append(ids, e.ID)
		}
	}
	return ids
}

// deadIDs lists the dead letters on disk (<spool>/dead/<id>.json).
func (h *harness) deadIDs() []string { return h.ids(filepath.Join(h.spool, "dead")) }

func (h *harness) ids(dir string) []string {
	h.t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		h.t.Fatalf("reading %s: %v", dir, err)
	}
	var ids []string
	for _, e := range entries {
		if n := e.Name(); !e.IsDir() && !strings.HasPrefix(n, ".") && strings.HasSuffix(n, ".msg") {
			ids = append(ids, strings.TrimSuffix(n, ".msg"))
		}
	}
	return ids
}

// tmpFiles lists in-progress writes (.tmp-*) left in the spool.
func (h *harness) tmpFiles() []string {
	h.t.Helper()
	var out []string
	for _, dir := range []string{h.spool, filepath.Join(h.spool, "dead")} {
		m, _ := filepath.Glob(filepath.Join(dir, ".tmp-*"))
		out = append(out, m...)
	}
	return out
}

// waitSpoolEmpty waits until no live message is left on disk or in the
// relay's queue gauge.
func (h *harness) waitSpoolEmpty(timeout time.Duration) {
	h.t.Helper()
	waitFor(h.t, timeout, "spool to be empty", func() bool {
		return len(h.spoolIDs()) == 0 && h.metric("relaycar_spool_messages") == 0
	})
}

// send submits one message with go-smtp's client and returns the spool id
// from the 250 reply. SMTP refusals come back as (wrapped) *smtp.SMTPError.
func (h *harness) send(from string, rcpts []string, data string) (string, error) {
	conn, err := net.DialTimeout("tcp", h.smtp, 5*time.Second)
	if err != nil {
		return "", err
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout, c.SubmissionTimeout = 15*time.Second, 15*time.Second
	defer c.Close()
	if err := c.Hello("tests.local"); err != nil {
		return "", fmt.Errorf("EHLO: %w", err)
	}
	if err := c.Mail(from, nil); err != nil {
		return "", fmt.Errorf("MAIL: %w", err)
	}
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return "", fmt.Errorf("RCPT %s: %w", r, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return "", fmt.Errorf("DATA: %w", err)
	}
	if _, err := io.WriteString(w, data); err != nil {
		w.Close()
		return "", fmt.Errorf("DATA: %w", err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", fmt.Errorf("end of DATA: %w", err)
	}
	c.Quit()
	_, id, ok := strings.Cut(resp.StatusText, "queued as ")
	if !ok {
		return "", fmt.Errorf("250 without a spool id: %q", resp.StatusText)
	}
	return strings.TrimSpace(id), nil
}

// mustSend is send that fails the test unless the relay answers 250.
func (h *harness) mustSend(from string, rcpts []string, data string) string {
	h.t.Helper()
	id, err := h.send(from, rcpts, data)
	if err != nil {
		h.t.Fatalf("send: %v", err)
	}
	return id
}

// rawConn is a hand-driven SMTP connection for byte-exact cases.
type rawConn struct {
	t  *testing.T
	c  net.Conn
	tp *textproto.Conn
}

func (h *harness) dialRaw() *rawConn {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", h.smtp, 5*time.Second)
	if err != nil {
		h.t.Fatalf("dial: %v", err)
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	h.t.Cleanup(func() { c.Close() })
	return &rawConn{t: h.t, c: c, tp: textproto.NewConn(c)}
}

// expect reads one (possibly multi-line) reply and fails unless its code
// is code; it returns the text after the code.
func (r *rawConn) expect(code int) string {
	r.t.Helper()
	got, msg, err := r.tp.ReadResponse(0)
	if err != nil && got == 0 {
		r.t.Fatalf("reading reply: %v", err)
	}
	if got != code {
		r.t.Fatalf("reply %d %s, want %d", got, msg, code)
	}
	return msg
}

// cmd sends one command line and expects code.
func (r *rawConn) cmd(code int, format string, args ...any) string {
	r.t.Helper()
	if err := r.tp.PrintfLine(format, args...); err != nil {
		r.t.Fatalf("writing %q: %v", fmt.Sprintf(format, args...), err)
	}
	return r.expect(code)
}

// write sends bytes exactly as given.
func (r *rawConn) write(b string) {
	r.t.Helper()
	if _, err := io.WriteString(r.c, b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// waitFor polls cond until it holds, failing the test after timeout (a
// thin wrapper over testwait.For, kept for its many call sites).
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, timeout, what, cond)
}

// message builds a small RFC 5322 message with a unique Message-ID and an
// X-Test-Seq header the sinks can be searched by.
func message(from, to string, seq int, subject string) string {
	return fmt.Sprintf("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <seq-%d.%d@tests.local>\r\nX-Test-Seq: %d\r\n\r\n"+
		"Hello from the relaycar integration tests, message %d.\r\n",
		from, to, subject, time.Now().Format(time.RFC1123Z), seq, time.Now().UnixNano(), seq, seq)
}

// header returns a header of a message the sink received.
func header(t testing.TB, data []byte, name string) string {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("sink got an unparsable message: %v\n%s", err, data)
	}
	return m.Header.Get(name)
}

// smtpCode returns the SMTP reply code in err, or 0 (testwait.SMTPCode).
func smtpCode(err error) int { return testwait.SMTPCode(err) }

// deadEnvelope reads a dead letter's state the way `relaycar queue dead`
// does, through the spool package (the files are not JSON any more).
func deadEnvelope(t testing.TB, spoolDir, id string) *spool.Envelope {
	t.Helper()
	sp, err := spool.Open(spoolDir, spool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	envs, err := sp.Dead()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range envs {
		if e.ID == id {
			return e
		}
	}
	t.Fatalf("no dead letter %s in %s", id, spoolDir)
	return nil
}
