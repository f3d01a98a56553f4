package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/relaycar/relaycar/relay"
	"github.com/relaycar/relaycar/upstreams"
)

// checkLive checks every upstream of cfg at once (each bounded by its own
// timeout, at most 10 s) and prints one line per upstream in config order:
// "upstreams[i] (name): ok (...)" or "upstreams[i] (name): <problem>". It
// reports whether all were ok.
func checkLive(ctx context.Context, cfg *relay.Config, stdout io.Writer) bool {
	lines := make([]string, len(cfg.Upstreams))
	oks := make([]bool, len(cfg.Upstreams))
	deps := upstreams.Deps{Hostname: cfg.Listen.Hostname}
	var wg sync.WaitGroup
	for i, c := range cfg.Upstreams {
		wg.Go(func() {
			detail, err := upstreams.CheckLive(ctx, c, deps)
			prefix := fmt.Sprintf("upstreams[%d] (%s): ", i, c.Name)
			if err != nil {
				lines[i] = prefix + liveProblemText(c.Name, err)
				return
			}
			lines[i], oks[i] = prefix+"ok", true
			if detail != "" {
				lines[i] += " (" + detail + ")"
			}
		})
	}
	wg.Wait()
	all := true
	for i, l := range lines {
		fmt.Fprintln(stdout, l)
		all = all && oks[i]
	}
	return all
}

// liveProblemText is the error without the upstream name the line already
// gives: "provider_fault (401): <reason>".
func liveProblemText(name string, err error) string {
	s := strings.TrimPrefix(err.Error(), "upstream "+fmt.Sprintf("%q", name)+": ")
	return strings.TrimPrefix(s, name+": ")
}
