package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"text/tabwriter"
	"time"

	"github.com/relaycar/relaycar/internal/adminapi"
	"github.com/relaycar/relaycar/relay"
	"github.com/relaycar/relaycar/relay/spool"
)

const queueSynopsis = `queue ls|dead|retry ID|retry --all|drop ID [--config F] [--json]

  ls          list queued messages
  dead        list dead letters with their reason
  retry ID    retry a queued message now, or requeue a dead letter
  retry --all retry every queued message now
  drop ID     delete a message (queued or dead)

Works on spool.dir. While relaycar serve runs it holds the spool lock, and
retry/drop go through its admin API (admin.address) instead of the files.`

func cmdQueue(args []string, stdout, stderr io.Writer) int {
	fset, cfgPath := newFlags("queue", queueSynopsis, stderr)
	all := fset.Bool("all", false, "with retry: every queued message")
	asJSON := fset.Bool("json", false, "print JSON instead of a table")
	// Allow flags after the subcommand: queue retry --all.
	var pos []string
	for len(args) > 0 {
		if done, code := parseFlags(fset, args, stdout); done {
			return code
		}
		args = fset.Args()
		if len(args) > 0 {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
	if len(pos) == 0 {
		fset.Usage()
		return exitUsage
	}
	cfg, ok := loadSections(*cfgPath, stderr, "spool", "admin")
	if !ok {
		return exitUsage
	}
	if _, err := os.Stat(cfg.Spool.Dir); err != nil {
		// Do not create an empty spool and report "0 messages" for a typo.
		fmt.Fprintf(stderr, "relaycar queue: spool.dir: %v\n", err)
		return exitUsage
	}
	sp, err := spool.Open(cfg.Spool.Dir, spool.Options{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		fmt.Fprintf(stderr, "relaycar queue: spool.dir: %v\n", err)
		return exitRuntime
	}
	sub, rest := pos[0], pos[1:]
	switch sub {
	case "ls", "dead":
		list := sp.List
		if sub == "dead" {
			list = sp.Dead
		}
		envs, err := list()
		if err != nil {
			fmt.Fprintf(stderr, "relaycar queue: %v\n", err)
			return exitRuntime
		}
		if err := printEntries(stdout, envs, sub == "dead", *asJSON); err != nil {
			// A listing cut short (a full disk, a closed pipe) must not
			// pass for the whole queue in a script.
			fmt.Fprintf(stderr, "relaycar queue: writing the listing: %v\n", err)
			return exitRuntime
		}
		return exitOK
	case "retry", "drop":
		if (sub == "retry" && *all) != (len(rest) == 0) || len(rest) > 1 {
			fmt.Fprintf(stderr, "relaycar queue %s: give one message ID%s\n", sub, map[bool]string{true: " or --all", false: ""}[sub == "retry"])
			return exitUsage
		}
		id := ""
		if len(rest) == 1 {
			id = rest[0]
		}
		var msg string
		if sp.Locked() {
			msg, err = viaAPI(cfg.Admin.Address, sub, id)
		} else {
			msg, err = viaFiles(sp, sub, id)
		}
		if err != nil {
			fmt.Fprintf(stderr, "relaycar queue %s: %v\n", sub, err)
			if errors.Is(err, fs.ErrNotExist) {
				return exitUsage
			}
			return exitRuntime
		}
		fmt.Fprintln(stdout, msg)
		return exitOK
	}
	fmt.Fprintf(stderr, "relaycar queue: unknown subcommand %q\n", sub)
	return exitUsage
}

// viaFiles acts on the spool directly; only when no relay holds the lock.
func viaFiles(sp *spool.Spool, sub, id string) (string, error) {
	if err := sp.Lock(); err != nil {
		return "", err
	}
	defer sp.Unlock()
	// Holding the lock, do what serve does first: finish what a crash
	// interrupted and migrate an older release's files, so that every
	// entry can be changed.
	if _, _, err := sp.Load(); err != nil {
		return "", err
	}
	defer sp.Close()
	now := time.Now()
	switch {
	case sub == "drop":
		if err := sp.Drop(id); err != nil {
			return "", err
		}
		return "dropped " + id, nil
	case id == "":
		envs, err := sp.List()
		if err != nil {
			return "", err
		}
		for _, e := range envs {
			e.NextAttempt = now.UTC()
			if err := sp.Update(e); err != nil {
				return "", err
			}
		}
		return fmt.Sprintf("%d messages due now (delivered at the next start)", len(envs)), nil
	}
	if e, err := sp.Get(id); err == nil {
		e.NextAttempt = now.UTC()
		return "retry scheduled for " + id + " (at the next start)", sp.Update(e)
	}
	if _, err := sp.Resurrect(id, now); err != nil {
		return "", err
	}
	return "requeued dead letter " + id + " (delivered at the next start)", nil
}

// viaAPI asks the running relay, which owns the spool while it serves.
func viaAPI(addr, sub, id string) (string, error) {
	if addr == "" {
		return "", errors.New("a relay is running on this spool and admin.address is empty; cannot reach it")
	}
	addr = localAddr(addr)
	method, path := http.MethodPost, adminapi.RetryAll
	switch {
	case sub == "drop":
		method, path = http.MethodDelete, adminapi.Message(id)
	case id != "":
		path = adminapi.Retry(id)
	}
	req, _ := http.NewRequest(method, "http://"+addr+path, nil)
	// The admin API refuses state changes without it: a cross-site form in
	// an operator's browser cannot send a custom header.
	req.Header.Set(adminapi.ChangeHeader, "1")
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("relay is running but its admin API is unreachable: %w", err)
	}
	defer resp.Body.Close()
	var body map[string]any
	json.NewDecoder(resp.Body).Decode(&body)
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return "", fmt.Errorf("%s: %w", id, fs.ErrNotExist)
	default:
		return "", fmt.Errorf("admin API: %s: %v", resp.Status, body["error"])
	}
	switch {
	case sub == "drop":
		return "dropped " + id, nil
	case id == "":
		return fmt.Sprintf("%v messages due now", body["retried"]), nil
	}
	return "retrying " + id, nil
}

func printEntries(w io.Writer, envs []*relay.Envelope, dead, asJSON bool) error {
	if asJSON {
		out := make([]relay.QueueEntry, 0, len(envs))
		for _, e := range envs {
			out = append(out, relay.Entry(e))
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if dead {
		fmt.Fprintln(tw, "ID\tDEAD AT\tFROM\tRCPTS\tREASON")
		for _, e := range envs {
			at := ""
			if e.DeadAt != nil {
				at = e.DeadAt.Local().Format(time.DateTime)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", e.ID, at, e.From, len(e.Rcpts), e.DeadReason)
		}
	} else {
		fmt.Fprintln(tw, "ID\tRECEIVED\tFROM\tRCPTS\tATTEMPTS\tNEXT\tLAST ERROR")
		for _, e := range envs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", e.ID, e.ReceivedAt.Local().Format(time.DateTime), e.From,
				len(e.Rcpts), e.Attempts, e.NextAttempt.Local().Format(time.TimeOnly), e.LastError)
		}
	}
	// The tabwriter holds every row until Flush, which reports the first
	// write error; the summary line is written after it.
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d messages\n", len(envs))
	return err
}
