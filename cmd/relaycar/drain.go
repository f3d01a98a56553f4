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
	"syscall"
	"time"

	"github.com/relaycar/relaycar/relay"
	"github.com/relaycar/relaycar/relay/spool"
)

// cmdDrain hands a spool whose relay is gone (a removed replica's volume)
// to a running relaycar. It takes the spool's lock, so it never runs
// against a live relay, and it can be rerun: what was drained is gone.
func cmdDrain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("drain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("spool", "", "spool directory to drain (required)")
	to := fs.String("to", "", "host:port of the relaycar to hand the messages to (required)")
	hostname := fs.String("hostname", "", "EHLO name (default: this host's name)")
	timeout := fs.Duration("timeout", 30*time.Second, "per SMTP command and message")
	connect := fs.Duration("connect-for", 30*time.Second, "how long to keep trying to reach the peer")
	level := fs.String("log-level", "warn", "debug, info, warn or error")
	cfgPath := fs.String("config", os.Getenv("RELAYCAR_CONFIG"), "the gone relay's config (default $RELAYCAR_CONFIG): its routes' redirect_all_to is applied before the hand-over")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: relaycar drain --spool DIR --to host:port [--config relay.yaml]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if done, code := parseFlags(fs, args, stdout); done {
		return code
	}
	if *dir == "" || *to == "" || fs.NArg() > 0 {
		fs.Usage()
		return exitUsage
	}
	if _, port, err := net.SplitHostPort(*to); err != nil || port == "" {
		fmt.Fprintf(stderr, "relaycar drain: --to %q: want host:port\n", *to)
		return exitUsage
	}
	if _, err := os.Stat(*dir); err != nil {
		// Do not create an empty spool and report "0 drained" for a typo.
		fmt.Fprintf(stderr, "relaycar drain: --spool: %v\n", err)
		return exitUsage
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(stderr, "--log-level: %v\n", err)
		return exitUsage
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	var redirect func(string) []string
	if *cfgPath != "" {
		cfg, ok := loadSections(*cfgPath, stderr, "routes")
		if !ok {
			return exitUsage
		}
		routes := map[string][]string{}
		for _, rc := range cfg.Routes {
			routes[rc.Name] = rc.RedirectAllTo
		}
		redirect = func(route string) []string { return routes[route] }
	} else {
		log.Warn("no --config: messages of a redirect_all_to route are handed over to their original recipients, and only a peer that has the route and trusts this host redirects them")
	}
	sp, err := spool.Open(*dir, spool.Options{Log: log})
	if err != nil {
		fmt.Fprintf(stderr, "relaycar drain: --spool: %v\n", err)
		return exitRuntime
	}
	if err := sp.Lock(); err != nil {
		if errors.Is(err, spool.ErrLocked) {
			fmt.Fprintf(stderr, "relaycar drain: %s is in use by a running relay; stop it first (SIGTERM drains it if shutdown.drain_to is set)\n", *dir)
			return exitRuntime
		}
		fmt.Fprintf(stderr, "relaycar drain: %v\n", err)
		return exitRuntime
	}
	defer sp.Unlock()
	// What serve does first: finish what a crash interrupted, quarantine
	// damaged files and migrate an older release's.
	if _, broken, err := sp.Load(); err != nil {
		fmt.Fprintf(stderr, "relaycar drain: loading the spool: %v\n", err)
		return exitRuntime
	} else if broken > 0 {
		fmt.Fprintf(stderr, "relaycar drain: %d damaged files quarantined (.broken), not drained\n", broken)
	}
	defer sp.Close()
	if *hostname == "" {
		*hostname, _ = os.Hostname()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	envs, err := sp.List()
	if err != nil {
		fmt.Fprintf(stderr, "relaycar drain: %v\n", err)
		return exitRuntime
	}
	res := relay.Drainer{To: *to, Hostname: *hostname, Timeout: *timeout, ConnectFor: *connect, Log: log, Redirect: redirect}.Drain(ctx, sp, envs)
	fmt.Fprintf(stdout, "drained %d messages (%d recipients) to %s; %d left in the spool", res.Drained, res.Recipients, *to, res.Left)
	if res.Dead > 0 {
		fmt.Fprintf(stdout, "; %d dead letters kept (relaycar queue dead)", res.Dead)
	}
	fmt.Fprintln(stdout)
	if res.Left > 0 {
		return exitRuntime
	}
	return exitOK
}
