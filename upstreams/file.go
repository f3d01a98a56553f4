package upstreams

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/relaycar/relaycar/internal/atomicfile"
)

// fileUpstream writes each message to <dir>/<id>.eml plus <id>.json with the
// envelope. It needs no credentials, so the default relay.yaml can run
// anywhere, and tests can assert on what was "sent".
type fileUpstream struct {
	name string
	dir  string
	now  func() time.Time
	sync *atomicfile.GroupSync
}

// fileEnvelope is the JSON written next to each .eml.
type fileEnvelope struct {
	ID        string    `json:"id"`
	From      string    `json:"from"`
	To        []string  `json:"to"`
	MessageID string    `json:"message_id"`
	Size      int       `json:"size"`
	WrittenAt time.Time `json:"written_at"`
}

func newFile(c Config, d Deps) (*fileUpstream, error) {
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("dir: %v", err)
	}
	return &fileUpstream{name: c.Name, dir: c.Dir, now: d.now(), sync: d.syncFor(c.Dir)}, nil
}

// Name returns the configured name.
func (f *fileUpstream) Name() string { return f.name }

// Send writes the .eml first and the .json last, so a reader that sees the
// .json can rely on the .eml being complete, then waits for a shared sync
// of the file system (concurrent workers batch it). A resend after a crash
// overwrites the same names.
func (f *fileUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	base := filepath.Join(f.dir, m.ID)
	env, err := json.MarshalIndent(fileEnvelope{
		ID: m.ID, From: m.From, To: m.To, MessageID: m.MessageID, Size: int(m.size()), WrittenAt: f.now().UTC(),
	}, "", "  ")
	if err != nil {
		return Receipt{}, errorf(f.name, Transient, "", err, "encoding the envelope: %v", err)
	}
	if err := writeFile(base+".eml", m.Reader()); err != nil {
		return Receipt{}, errorf(f.name, Transient, "", err, "write: %v", err)
	}
	if err := os.WriteFile(base+".json", env, 0o600); err != nil {
		return Receipt{}, errorf(f.name, Transient, "", err, "write: %v", err)
	}
	f.sync.Wrote(m.size() + int64(len(env)))
	if err := f.sync.Sync(); err != nil {
		return Receipt{}, errorf(f.name, Transient, "", err, "sync: %v", err)
	}
	return Receipt{ProviderID: m.ID}, nil
}

// writeFile streams r into path (created or truncated, 0600).
func writeFile(path string, r io.Reader) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

var _ Upstream = (*fileUpstream)(nil)
