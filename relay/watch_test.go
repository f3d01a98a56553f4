package relay

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relaycar/relaycar/internal/testwait"
	"github.com/relaycar/relaycar/upstreams"
)

// A Kubernetes Secret volume: password -> ..data/password, ..data ->
// ..<timestamp>. An update writes a new timestamped dir and renames a new
// ..data symlink over the old one; the visible name never changes.
func TestWatchFiles_KubernetesSecretVolumeSwap(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(stamp, content string) {
		t.Helper()
		d := filepath.Join(dir, stamp)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "password"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(stamp, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	write("..2026_12_01_12_00_00.1", "old")
	if err := os.Symlink("..data/password", filepath.Join(dir, "password")); err != nil {
		t.Fatal(err)
	}
	var changes atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		WatchFiles(ctx, nil, func() []string { return []string{filepath.Join(dir, "password")} }, 10*time.Millisecond, func() { changes.Add(1) })
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	if n := changes.Load(); n != 0 {
		t.Fatalf("%d changes before any update", n)
	}
	for i, stamp := range []string{"..2026_12_01_12_05_00.2", "..2026_12_01_12_10_00.3"} {
		write(stamp, "new"+stamp)
		testwait.For(t, 5*time.Second, "the swap to be seen", func() bool { return changes.Load() == int32(i+1) })
	}
	time.Sleep(50 * time.Millisecond)
	if n := changes.Load(); n != 2 {
		t.Errorf("%d changes for 2 updates", n)
	}
	cancel()
	<-done
}

// DESIGN: a change to "every *_file" the config names reloads it. Every
// string field whose YAML key ends in _file, at any depth (the listener,
// redis, an upstream and its oauth2), gets its own path; Files must list
// each one, so a rotated secret is never missed (redis.password_file was:
// no reload, and so no "needs a restart" warning).
func TestConfigFiles_ListsEveryFileField(t *testing.T) {
	t.Parallel()
	cfg := Default()
	cfg.Upstreams = []upstreams.Config{{Name: "a"}}
	var want []string
	var fill func(v reflect.Value, path string)
	fill = func(v reflect.Value, path string) {
		switch v.Kind() {
		case reflect.Struct:
			for i := range v.NumField() {
				f := v.Type().Field(i)
				name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
				if !f.IsExported() || name == "-" {
					continue
				}
				if f.Type.Kind() == reflect.String && strings.HasSuffix(name, "_file") {
					p := "/secrets/" + path + name
					v.Field(i).SetString(p)
					want = append(want, p)
					continue
				}
				fill(v.Field(i), path+name+".")
			}
		case reflect.Slice:
			for i := range v.Len() {
				fill(v.Index(i), path+"0.")
			}
		case reflect.Pointer:
			if !v.IsNil() {
				fill(v.Elem(), path)
			}
		}
	}
	fill(reflect.ValueOf(&cfg).Elem(), "")
	if len(want) < 10 {
		t.Fatalf("found only %d *_file fields: %v", len(want), want)
	}
	got := cfg.Files()
	for _, p := range want {
		if !slices.Contains(got, p) {
			t.Errorf("Files() lacks %s", strings.TrimPrefix(p, "/secrets/"))
		}
	}
}
