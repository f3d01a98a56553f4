package tests

import (
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testsmtp"
)

// Upgrades keep mail: a spool written by the previous release (spool
// format v2, commit 1721dd1; made by tools/spoolfixture with two queued
// messages, two partly delivered ones, one across two routes, and a dead
// letter) is started by this binary and delivered: every pending
// recipient once with its original Message-ID, no recipient delivered
// before the upgrade again, the dead letter kept with its reason. The v1
// format's fixture has its own test, TestDataPath_V1SpoolDeliveredByNewBinary.
func TestUpgrade_PreviousReleasesSpoolIsDelivered(t *testing.T) {
	for _, fixture := range []string{"v2-1721dd1"} {
		t.Run(fixture, func(t *testing.T) {
			t.Parallel()
			spoolDir := filepath.Join(t.TempDir(), "spool")
			copyTree(t, filepath.Join(repoRoot, "relay/spool/testdata", fixture), spoolDir)
			sink := testsmtp.Start(t, testsmtp.Options{})
			h := newHarness(t, fmt.Sprintf(`
spool: {dir: %q}
upstreams:
  - {name: sink, type: smtp, address: %q, tls: none}
routes:
  - {name: partners, match: {recipient_domains: [partner.example]}, upstreams: [sink]}
  - {name: default, upstreams: [sink]}
`, spoolDir, sink.Addr))
			// The fixture's next attempts lie an hour after it was made.
			if code, out := runCLI(t, h.dir, nil, "queue", "retry", "--all", "--config", "relay.yaml"); code != 0 {
				t.Fatalf("queue retry --all: exit %d, %s", code, out)
			}
			h.waitSpoolEmpty(15 * time.Second)
			time.Sleep(300 * time.Millisecond) // a duplicate would show up by now
			got := map[string][]string{}
			for _, m := range sink.Messages() {
				pm, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
				if err != nil {
					t.Fatal(err)
				}
				id := pm.Header.Get("Message-Id")
				got[id] = append(got[id], m.To...)
			}
			want := map[string][]string{
				"<fixture-queued-1@example.com>": {"ok@example.net"},
				"<fixture-queued-2@example.com>": {"ok@example.net"},
				"<fixture-partial@example.com>":  {"later@example.net"},
				"<fixture-split@example.com>":    {"later@partner.example"},
			}
			for id, rcpts := range want {
				if !slices.Equal(got[id], rcpts) {
					t.Errorf("%s delivered to %v, want %v", id, got[id], rcpts)
				}
			}
			if len(got) != len(want) {
				t.Errorf("delivered %v, want exactly %v", got, want)
			}
			dead := h.deadIDs()
			if len(dead) != 1 {
				t.Fatalf("dead letters %v, want the fixture's one", dead)
			}
			if env := deadEnvelope(t, h.spool, dead[0]); !strings.Contains(env.DeadReason, "550 5.1.1") {
				t.Errorf("dead letter reason %q", env.DeadReason)
			}
		})
	}
}

// copyTree copies a fixture directory (files 0600, dirs 0700, as the
// spool keeps them).
func copyTree(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.Walk(from, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(to, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
}
