package relay

import (
	"path/filepath"
	"strings"
	"testing"
)

// New's doc promises that a bad certificate fails before anything
// listens; it used to surface only in Run, after both sockets were bound.
func TestNew_BadCertificateFailsBeforeListening(t *testing.T) {
	t.Parallel()
	cfg := Default()
	dir := t.TempDir()
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	cfg.Listen.TLS = TLSConfig{CertFile: filepath.Join(dir, "missing.crt"), KeyFile: filepath.Join(dir, "missing.key")}
	r, err := New(&cfg, Deps{})
	if err == nil || !strings.Contains(err.Error(), "listen.tls") {
		t.Fatalf("New with a missing certificate = %v, %v; want a listen.tls error", r, err)
	}
}
