package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relaycar/relaycar/internal/memlimit"
	"github.com/relaycar/relaycar/internal/yamlconf"
	"github.com/relaycar/relaycar/relay"
)

// Exit codes.
const (
	exitOK      = 0
	exitUsage   = 1 // bad config, bad flags
	exitRuntime = 2 // failed while running
)

// Set by -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = ""
)

const usage = `relaycar — SMTP sidecar with a durable spool and provider failover

Usage:
  relaycar [serve] [--config relay.yaml] [--log-level info] [--log-format text|json] [--reload-poll 5s]
                                            run the relay (default)
  relaycar check [--config F] [--live]      validate the config; --live also checks every
                                            upstream without sending mail
  relaycar send [--to A[,B]] [--from A] [--subject S] [--server host:port]
                                            send a test message through a running relay
  relaycar queue ls|dead|retry ID|retry --all|drop ID [--json] [--config F]
                                            inspect and act on the spool
  relaycar drain --spool DIR --to host:port hand a stopped relay's spool to a running relaycar
  relaycar version                          print version, commit and Go version

--config defaults to $RELAYCAR_CONFIG, then ./relay.yaml.
Run "relaycar <command> --help" for the flags of a command.
`

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	switch cmd {
	case "serve":
		return cmdServe(args, stdout, stderr)
	case "check":
		return cmdCheck(args, stdout, stderr)
	case "send":
		return cmdSend(args, stdout, stderr)
	case "queue":
		return cmdQueue(args, stdout, stderr)
	case "drain":
		return cmdDrain(args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "relaycar: unknown command %q\n\n%s", cmd, usage)
	return exitUsage
}

func versionString() string {
	c := commit
	if c == "" {
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" {
					c = s.Value
				}
			}
		}
	}
	if c == "" {
		c = "unknown"
	}
	return fmt.Sprintf("relaycar %s (commit %s, %s %s/%s)", version, c, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// newFlags returns a flag set whose --help prints to stdout and exits 0.
func newFlags(name, synopsis string, stderr io.Writer) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := os.Getenv("RELAYCAR_CONFIG")
	if def == "" {
		def = "relay.yaml"
	}
	cfg := fs.String("config", def, "config file (default $RELAYCAR_CONFIG, then ./relay.yaml)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: relaycar %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs, cfg
}

// parseFlags returns (done, exit code) when parsing ends the command.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) (bool, int) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return true, exitOK
		}
		return true, exitUsage
	}
	return false, 0
}

// loadConfig loads and validates; problems go to stderr one per line.
func loadConfig(path string, stderr io.Writer) (*relay.Config, bool) {
	cfg, err := relay.LoadValid(path)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintf(stderr, "%s\n", line)
		}
		return nil, false
	}
	return cfg, true
}

// loadSections loads path for a command that reads only some sections
// (queue: spool and admin): a problem elsewhere, such as an API key's
// unset variable in an operator's shell, does not stop it.
func loadSections(path string, stderr io.Writer, sections ...string) (*relay.Config, bool) {
	cfg, err := relay.Load(path)
	if cfg == nil {
		fmt.Fprintf(stderr, "%v\n", err)
		return nil, false
	}
	// What Validate says about these sections counts too; and a key the
	// config does not have at all ("route:" for "routes:") would leave a
	// section silently empty.
	known := map[string]bool{}
	for _, f := range reflect.VisibleFields(reflect.TypeOf(*cfg)) {
		known[strings.Split(f.Tag.Get("yaml"), ",")[0]] = true
	}
	ok := true
	for _, e := range append(unjoin(err), unjoin(cfg.Validate())...) {
		var fe yamlconf.FieldError
		if errors.As(e, &fe) && known[topKey(fe.Path)] && !slices.Contains(sections, topKey(fe.Path)) {
			continue
		}
		fmt.Fprintf(stderr, "%v\n", e)
		ok = false
	}
	return cfg, ok
}

// topKey is the first key of a YAML path: "spool" of "spool.dir",
// "routes" of "routes[2].name".
func topKey(path string) string {
	if i := strings.IndexAny(path, ".["); i >= 0 {
		return path[:i]
	}
	return path
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	if err != nil {
		return []error{err}
	}
	return nil
}

func cmdServe(args []string, stdout, stderr io.Writer) int {
	fs, cfgPath := newFlags("serve", "serve [--config relay.yaml] [--log-level info] [--log-format text|json] [--reload-poll 5s]", stderr)
	level := fs.String("log-level", envOr("RELAYCAR_LOG_LEVEL", "info"), "debug, info, warn or error ($RELAYCAR_LOG_LEVEL)")
	format := fs.String("log-format", envOr("RELAYCAR_LOG_FORMAT", "text"), "text or json ($RELAYCAR_LOG_FORMAT)")
	poll := fs.Duration("reload-poll", 5*time.Second, "how often to check the config and the files it names for changes (0: only on SIGHUP)")
	if done, code := parseFlags(fs, args, stdout); done {
		return code
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(stderr, "--log-level: %v\n", err)
		return exitUsage
	}
	hopts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler
	switch *format {
	case "text":
		h = slog.NewTextHandler(stderr, hopts)
	case "json":
		h = slog.NewJSONHandler(stderr, hopts)
	default:
		fmt.Fprintf(stderr, "--log-format: %q: must be text or json\n", *format)
		return exitUsage
	}
	log := slog.New(h)
	// The files of the config on disk, even one that does not load: a
	// reload that failed for want of a file is retried when it appears.
	configFiles := func() []string {
		paths := []string{*cfgPath}
		if c, _ := relay.Load(*cfgPath); c != nil {
			paths = append(paths, c.Files()...)
		}
		return paths
	}
	// Before the config is read: what changes while the relay starts is
	// reloaded at the first poll.
	startSums := relay.SumFiles(configFiles())
	cfg, ok := loadConfig(*cfgPath, stderr)
	if !ok {
		return exitUsage
	}
	setGoMemLimit(log)
	// From here on SIGHUP never ends the process (Go's default), not during
	// the spool load, not during the drain at the end. One that comes
	// before the relay is up is applied once it is.
	var reloader atomic.Pointer[relay.Relay]
	var earlyHUP atomic.Bool
	go handleSignals(log, func() {
		if r := reloader.Load(); r != nil {
			r.ReloadFrom(*cfgPath)
		} else {
			log.Info("SIGHUP while the relay starts; reloading once it is up")
			earlyHUP.Store(true)
			// The relay may have come up meanwhile: whoever takes the flag
			// reloads.
			if r := reloader.Load(); r != nil && earlyHUP.CompareAndSwap(true, false) {
				r.ReloadFrom(*cfgPath)
			}
		}
	})
	r, err := relay.New(cfg, relay.Deps{Logger: log, Version: version})
	if err != nil {
		log.Error("startup failed", "err", err)
		return exitRuntime
	}
	if err := r.Listen(); err != nil {
		log.Error("startup failed", "err", err)
		return exitRuntime
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	reloader.Store(r)
	if earlyHUP.CompareAndSwap(true, false) {
		r.ReloadFrom(*cfgPath)
	}
	if *poll > 0 {
		files := func() []string { return append(configFiles(), r.ConfigFiles()...) }
		go relay.WatchFiles(ctx, startSums, files, *poll, func() {
			log.Info("config or a file it names changed; reloading")
			r.ReloadFrom(*cfgPath)
		})
	}
	if err := r.Run(ctx); err != nil {
		log.Error("relay failed", "err", err)
		return exitRuntime
	}
	return exitOK
}

// setGoMemLimit makes the garbage collector work harder near the
// container's memory limit instead of the kernel OOM-killing the relay
// (unless GOMEMLIMIT is set). The memory budget keeps the heap under it.
func setGoMemLimit(log *slog.Logger) {
	limit, source, err := memlimit.ContainerLimit()
	if err != nil {
		log.Warn("reading the container memory limit failed", "err", err)
		return
	}
	if limit <= 0 {
		log.Debug("no container memory limit", "source", source)
		return
	}
	goLimit, why, err := memlimit.SetGoMemLimit(limit)
	if err != nil {
		log.Warn("setting the Go memory limit failed", "err", err)
		return
	}
	log.Info("Go memory limit", "bytes", goLimit, "container_limit", limit, "why", why)
}

// handleSignals reloads on SIGHUP and logs SIGUSR1/SIGUSR2, all of which
// would otherwise end the process (Go's default). It runs for the life of
// the process: a signal during the drain must not cut it short.
func handleSignals(log *slog.Logger, reload func()) {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	for sig := range sigs {
		if sig == syscall.SIGHUP {
			log.Info("SIGHUP: reloading the config")
			reload()
			continue
		}
		log.Warn("signal ignored; SIGHUP reloads, SIGTERM stops", "signal", sig.String())
	}
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs, cfgPath := newFlags("check", "check [--config relay.yaml] [--live]", stderr)
	live := fs.Bool("live", false, "also check every upstream without sending mail (credentials, account, quota, sandbox)")
	if done, code := parseFlags(fs, args, stdout); done {
		return code
	}
	cfg, ok := loadConfig(*cfgPath, stderr)
	if !ok {
		return exitUsage
	}
	fmt.Fprintf(stdout, "%s: ok (%d upstreams, %d routes)\n", *cfgPath, len(cfg.Upstreams), len(cfg.Routes))
	if *live && !checkLive(context.Background(), cfg, stdout) {
		return exitUsage
	}
	return exitOK
}

// localAddr turns a wildcard listen address (":9025", "0.0.0.0:2525",
// "[::]:25") into one a client on this host can dial: loopback, which is
// also what the admin API requires for queue changes.
func localAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return addr
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
