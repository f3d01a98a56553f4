package relay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/relaycar/relaycar/internal/memlimit"
	"github.com/relaycar/relaycar/internal/yamlconf"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/upstreams"
)

// Config is relay.yaml. Each package owns the part it consumes.
type Config struct {
	Listen ListenConfig `yaml:"listen"`
	Admin  AdminConfig  `yaml:"admin"`
	Spool  SpoolConfig  `yaml:"spool"`
	// ShutdownGrace is the older spelling of Shutdown.Grace, still read.
	ShutdownGrace time.Duration        `yaml:"shutdown_grace"`
	Shutdown      ShutdownConfig       `yaml:"shutdown"`
	Upstreams     []upstreams.Config   `yaml:"upstreams"`
	Routes        []policy.RouteConfig `yaml:"routes"`
	Redis         RedisConfig          `yaml:"redis"`
}

// RedisConfig is the shared state of several replicas (shared rate limits
// and throttle pauses).
type RedisConfig struct {
	Address      string           `yaml:"address"`
	Password     upstreams.Secret `yaml:"password"`
	PasswordFile string           `yaml:"password_file"`
	TLS          bool             `yaml:"tls"`
	KeyPrefix    string           `yaml:"key_prefix"`
	// Replicas divides per_second while Redis is unreachable, so the
	// fleet stays near the account's rate without it.
	Replicas int `yaml:"replicas"`
}

// ShutdownConfig is what SIGTERM does: deliver for Grace, then hand what
// is left to DrainTo (another relaycar's SMTP address), if set.
type ShutdownConfig struct {
	Grace   time.Duration `yaml:"grace"`
	DrainTo string        `yaml:"drain_to"`
}

// Grace is how long SIGTERM keeps delivering: shutdown.grace, or the
// older shutdown_grace.
func (c *Config) Grace() time.Duration {
	if c.Shutdown.Grace > 0 {
		return c.Shutdown.Grace
	}
	return c.ShutdownGrace
}

// ListenConfig is the SMTP listener.
type ListenConfig struct {
	Address         string        `yaml:"address"`
	Hostname        string        `yaml:"hostname"`
	MaxMessageBytes int64         `yaml:"max_message_bytes"`
	MaxRecipients   int           `yaml:"max_recipients"`
	ReadTimeout     time.Duration `yaml:"read_timeout"`
	WriteTimeout    time.Duration `yaml:"write_timeout"`
	AllowedNetworks []string      `yaml:"allowed_networks"`
	AllowedSenders  []string      `yaml:"allowed_senders"`
	TLS             TLSConfig     `yaml:"tls"`
	Auth            AuthConfig    `yaml:"auth"`
	BareLF          BareLFMode    `yaml:"bare_lf"`
	// MaxConnections caps open SMTP connections; beyond it clients get 421.
	MaxConnections int `yaml:"max_connections"`
	// DataTimeout bounds a whole DATA transfer; ReadTimeout applies to each
	// read and moves while bytes arrive.
	DataTimeout time.Duration `yaml:"data_timeout"`
	// TrustedNetworks are the clients whose X-Relay-* routing headers are
	// honoured; empty means every allowed client.
	TrustedNetworks []string `yaml:"trusted_networks"`
}

// BareLFMode is what the listener does with a bare CR or LF in DATA.
type BareLFMode string

const (
	BareLFReject    BareLFMode = "reject"    // 550 5.6.0
	BareLFNormalize BareLFMode = "normalize" // to CRLF, as Postfix can
)

// AmbiguousPolicy is what follows an attempt whose outcome is unknown.
type AmbiguousPolicy string

const (
	RetrySame         AmbiguousPolicy = "retry_same" // only that upstream again: never sent by two
	FailoverAmbiguous AmbiguousPolicy = "failover"   // the next upstream: may deliver twice
)

// TLSConfig enables STARTTLS when both files are set.
type TLSConfig struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// AuthConfig enables AUTH PLAIN/LOGIN from an htpasswd (bcrypt) file.
type AuthConfig struct {
	UsersFile string `yaml:"users_file"`
}

// AdminConfig is the HTTP endpoint for metrics, probes and the queue API.
type AdminConfig struct {
	Address string `yaml:"address"`
	// AllowedHosts are Host header values accepted besides loopback names
	// and the listen address (a Kubernetes Service name, say); any other
	// Host is refused, which defeats DNS rebinding.
	AllowedHosts []string `yaml:"allowed_hosts"`
}

// SpoolConfig is the durable queue and its retry schedule.
type SpoolConfig struct {
	Dir         string             `yaml:"dir"`
	MaxAge      time.Duration      `yaml:"max_age"`
	Retry       policy.RetryConfig `yaml:"retry"`
	Workers     int                `yaml:"workers"`
	OnAmbiguous AmbiguousPolicy    `yaml:"on_ambiguous"`
	// MemoryBudget bounds what intake and in-memory deliveries hold:
	// bytes, or "auto" (half the container's memory limit).
	MemoryBudget string `yaml:"memory_budget"`
	// MaxBytes caps what the spool's files may take, in bytes or with a
	// unit (1Gi, 512MiB); empty is no cap beyond the file system's space.
	// The chart sets it to an emptyDir's sizeLimit, past which the kubelet
	// evicts the pod, spool and all.
	MaxBytes string `yaml:"max_bytes"`
}

// maxBytes is spool.max_bytes in bytes, 0 for none (Validate refused a
// bad one).
func (s SpoolConfig) maxBytes() int64 {
	n, _ := memlimit.ParseSize(s.MaxBytes)
	return n
}

// Default returns the documented defaults; Load decodes relay.yaml over it.
func Default() Config {
	return Config{
		Listen: ListenConfig{
			Address:         "127.0.0.1:2525",
			Hostname:        "relaycar.local",
			MaxMessageBytes: 25 << 20,
			MaxRecipients:   100,
			ReadTimeout:     60 * time.Second,
			WriteTimeout:    60 * time.Second,
			AllowedNetworks: []string{"127.0.0.0/8", "::1/128"},
			BareLF:          BareLFReject,
			MaxConnections:  1000,
			DataTimeout:     10 * time.Minute,
		},
		Admin: AdminConfig{Address: "127.0.0.1:9025"},
		Spool: SpoolConfig{
			Dir:          "./spool",
			MaxAge:       48 * time.Hour,
			Retry:        policy.RetryConfig{Initial: 30 * time.Second, Max: 15 * time.Minute, Multiplier: 2},
			Workers:      16,
			OnAmbiguous:  RetrySame,
			MemoryBudget: "auto",
		},
		ShutdownGrace: 20 * time.Second,
		Redis:         RedisConfig{KeyPrefix: "relaycar", Replicas: 1},
	}
}

// Load reads, expands and decodes a config file and resolves `*_file`
// secrets. Problems come back joined, each a yamlconf.FieldError. Even
// with problems it returns the config (bad values left at their defaults)
// when the file was YAML at all, so callers can Validate and report
// everything at once; see LoadValid.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(b)
}

// unknownAnchorRE is yaml.v3's error for an alias without its anchor.
var unknownAnchorRE = regexp.MustCompile(`unknown anchor '.*?' referenced`)

// Parse is Load on bytes.
func Parse(b []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		// A password starting with * reads as an alias, and yaml.v3 names
		// the "anchor": the password. Config errors are logged.
		msg := unknownAnchorRE.ReplaceAllString(err.Error(), "a value starting with * (an alias in YAML) names no anchor: quote the value")
		return nil, fmt.Errorf("relay.yaml: %s", msg)
	}
	cfg := Default()
	if len(root.Content) == 0 {
		return &cfg, nil
	}
	doc := root.Content[0]
	errs := yamlconf.Expand(doc, os.LookupEnv)
	errs = append(errs, yamlconf.Check(doc, reflect.TypeOf(cfg))...)
	if hasKey(doc, "shutdown_grace") && hasKey(keyValue(doc, "shutdown"), "grace") {
		errs = append(errs, yamlconf.FieldError{Path: "shutdown_grace", Msg: "set only one of shutdown_grace and shutdown.grace (shutdown_grace is its older name)"})
	}
	if err := doc.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("relay.yaml: %v", err)
	}
	for i := range cfg.Upstreams {
		cfg.Upstreams[i].ApplyDefaults()
		errs = append(errs, cfg.Upstreams[i].ResolveSecrets(fmt.Sprintf("upstreams[%d]", i))...)
	}
	errs = append(errs, cfg.Redis.resolveSecrets()...)
	for i := range cfg.Routes {
		if cfg.Routes[i].Strategy == "" {
			cfg.Routes[i].Strategy = policy.Failover
		}
	}
	return &cfg, errors.Join(errs...)
}

// sameAddr reports whether two host:port strings name the same socket as
// far as the text tells (a hostname may still resolve to this pod; the
// hop header catches that).
func sameAddr(a, b string) bool {
	ah, ap, err1 := net.SplitHostPort(a)
	bh, bp, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || ap != bp {
		return false
	}
	norm := func(h string) string {
		if ip := net.ParseIP(h); ip != nil {
			// A listener on every address answers on loopback too.
			if ip.IsLoopback() || ip.IsUnspecified() {
				return "loopback"
			}
			return ip.String()
		}
		if h == "" || strings.EqualFold(h, "localhost") {
			// ":25" listens on every address, loopback included.
			return "loopback"
		}
		return strings.ToLower(h)
	}
	return norm(ah) == norm(bh)
}

// keyValue is the value of key in mapping n, nil if n is not a mapping or
// lacks it.
func keyValue(n *yaml.Node, key string) *yaml.Node {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

func hasKey(n *yaml.Node, key string) bool { return keyValue(n, key) != nil }

// LoadValid is Load then Validate, with the problems of both joined.
func LoadValid(path string) (*Config, error) {
	cfg, err := Load(path)
	if cfg == nil {
		return nil, err
	}
	verr := cfg.Validate()
	if verr == nil && err == nil {
		return cfg, nil
	}
	// One problem per path: a value that failed to load was left at its
	// default, so Validate's word on the same path would only repeat it.
	// An error without a path (none today) is always kept.
	all := slices.Clone(splitJoined(err))
	loaded := map[string]bool{}
	for _, e := range all {
		if fe, ok := fieldError(e); ok {
			loaded[fe.Path] = true
		}
	}
	for _, e := range splitJoined(verr) {
		if fe, ok := fieldError(e); !ok || !loaded[fe.Path] {
			all = append(all, e)
		}
	}
	return nil, errors.Join(all...)
}

func fieldError(err error) (yamlconf.FieldError, bool) {
	var fe yamlconf.FieldError
	ok := errors.As(err, &fe)
	return fe, ok
}

// Validate returns every problem in the config, joined, each a
// yamlconf.FieldError. It never prints secret values.
func (c *Config) Validate() error {
	var errs []error
	bad := func(path, format string, args ...any) {
		errs = append(errs, yamlconf.FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	l := c.Listen
	if _, _, err := net.SplitHostPort(l.Address); err != nil {
		bad("listen.address", "%q: want host:port", l.Address)
	}
	if l.Hostname == "" || strings.ContainsAny(l.Hostname, " \t\r\n") {
		bad("listen.hostname", "%q is not a host name", l.Hostname)
	}
	if l.MaxMessageBytes <= 0 {
		bad("listen.max_message_bytes", "must be positive")
	}
	if l.MaxRecipients <= 0 {
		bad("listen.max_recipients", "must be positive")
	}
	if l.ReadTimeout <= 0 {
		bad("listen.read_timeout", "must be positive")
	}
	if l.WriteTimeout <= 0 {
		bad("listen.write_timeout", "must be positive")
	}
	for i, n := range l.AllowedNetworks {
		if _, err := parseNetwork(n); err != nil {
			bad(fmt.Sprintf("listen.allowed_networks[%d]", i), "%q is not a CIDR or IP address", n)
		}
	}
	for i, d := range l.AllowedSenders {
		if d == "" || strings.ContainsAny(d, "@ ") {
			bad(fmt.Sprintf("listen.allowed_senders[%d]", i), "%q is not a domain", d)
		}
	}
	if (l.TLS.CertFile == "") != (l.TLS.KeyFile == "") {
		bad("listen.tls", "set both cert_file and key_file, or neither")
	} else if l.TLS.CertFile != "" {
		if _, err := loadTLS(l.TLS); err != nil {
			bad("listen.tls", "%v", err)
		}
	}
	if l.Auth.UsersFile != "" {
		if _, err := loadUsers(l.Auth.UsersFile); err != nil {
			bad("listen.auth.users_file", "%v", err)
		}
	}
	if l.BareLF != BareLFReject && l.BareLF != BareLFNormalize {
		bad("listen.bare_lf", "%q: must be reject or normalize", l.BareLF)
	}
	if l.MaxConnections < 1 {
		bad("listen.max_connections", "must be at least 1")
	}
	if l.DataTimeout <= 0 {
		bad("listen.data_timeout", "must be positive")
	}
	for i, n := range l.TrustedNetworks {
		if _, err := parseNetwork(n); err != nil {
			bad(fmt.Sprintf("listen.trusted_networks[%d]", i), "%q is not a CIDR or IP address", n)
		}
	}
	if c.Admin.Address != "" {
		if _, _, err := net.SplitHostPort(c.Admin.Address); err != nil {
			bad("admin.address", "%q: want host:port", c.Admin.Address)
		}
	}
	for i, h := range c.Admin.AllowedHosts {
		if h == "" || strings.ContainsAny(h, " \t\r\n/@") {
			bad(fmt.Sprintf("admin.allowed_hosts[%d]", i), "%q is not a host name", h)
		}
	}
	s := c.Spool
	if s.Dir == "" {
		bad("spool.dir", "required")
	}
	if s.MaxAge <= 0 {
		bad("spool.max_age", "must be positive")
	}
	if s.Retry.Initial <= 0 {
		bad("spool.retry.initial", "must be positive")
	}
	if s.Retry.Max < s.Retry.Initial {
		bad("spool.retry.max", "must be at least spool.retry.initial (%s)", s.Retry.Initial)
	}
	if s.Retry.Multiplier < 1 {
		bad("spool.retry.multiplier", "must be at least 1")
	}
	if s.Workers < 1 {
		bad("spool.workers", "must be at least 1")
	}
	if s.OnAmbiguous != RetrySame && s.OnAmbiguous != FailoverAmbiguous {
		bad("spool.on_ambiguous", "%q: must be retry_same or failover", s.OnAmbiguous)
	}
	if _, err := memlimit.ParseSize(s.MaxBytes); err != nil {
		bad("spool.max_bytes", "%v", err)
	}
	if _, err := memlimit.ParseBudget(s.MemoryBudget); err != nil {
		bad("spool.memory_budget", "%q: %v (bytes such as 268435456 or 256MiB, or auto)", s.MemoryBudget, err)
	}
	if c.ShutdownGrace < 0 {
		bad("shutdown_grace", "must not be negative")
	}
	if c.Shutdown.Grace < 0 {
		bad("shutdown.grace", "must not be negative")
	}
	if d := c.Shutdown.DrainTo; d != "" {
		if _, port, err := net.SplitHostPort(d); err != nil || port == "" {
			bad("shutdown.drain_to", "%q: want host:port of another relaycar", d)
		} else if sameAddr(d, c.Listen.Address) {
			bad("shutdown.drain_to", "%q is this relay's own listen.address: draining to yourself would loop", d)
		}
	}
	errs = append(errs, c.Redis.validate()...)
	known := map[string]bool{}
	if len(c.Upstreams) == 0 {
		bad("upstreams", "at least one upstream is required")
	}
	for i := range c.Upstreams {
		u := &c.Upstreams[i]
		path := fmt.Sprintf("upstreams[%d]", i)
		errs = append(errs, u.Validate(path)...)
		if u.RateLimit.Shared && c.Redis.Address == "" {
			bad(path+".rate_limit.shared", "needs redis.address")
		}
		if u.Name != "" && known[u.Name] {
			bad(path+".name", "%q is used twice", u.Name)
		}
		known[u.Name] = true
	}
	if len(c.Routes) == 0 {
		bad("routes", "at least one route is required")
	}
	routes := map[string]bool{}
	for i := range c.Routes {
		r := &c.Routes[i]
		path := fmt.Sprintf("routes[%d]", i)
		errs = append(errs, r.Validate(path, known)...)
		if r.Name != "" && routes[r.Name] {
			bad(path+".name", "%q is used twice", r.Name)
		}
		routes[r.Name] = true
	}
	return errors.Join(errs...)
}

// resolveSecrets reads password_file into password.
func (r *RedisConfig) resolveSecrets() []error {
	if r.PasswordFile == "" {
		return nil
	}
	if r.Password != "" {
		return []error{yamlconf.FieldError{Path: "redis.password", Msg: "set only one of password and password_file"}}
	}
	b, err := os.ReadFile(r.PasswordFile)
	if err != nil {
		// The OS error names the file, never its contents.
		return []error{yamlconf.FieldError{Path: "redis.password_file", Msg: err.Error()}}
	}
	r.Password = upstreams.Secret(strings.TrimRight(string(b), "\r\n"))
	return nil
}

func (r *RedisConfig) validate() []error {
	var errs []error
	bad := func(path, format string, args ...any) {
		errs = append(errs, yamlconf.FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	if r.Address != "" {
		if strings.Contains(r.Address, "@") {
			// A URL's user:password: never quoted back.
			bad("redis.address", "%q: want host:port, without a password (use redis.password or password_file)", withoutUserinfo(r.Address))
		} else if host, port, err := net.SplitHostPort(r.Address); err != nil || host == "" || port == "" {
			bad("redis.address", "%q: want host:port", r.Address)
		}
	}
	if r.KeyPrefix == "" || strings.ContainsAny(r.KeyPrefix, " \t\r\n") {
		bad("redis.key_prefix", "%q: must be non-empty without spaces", r.KeyPrefix)
	}
	if r.Replicas < 1 {
		bad("redis.replicas", "must be at least 1")
	}
	return errs
}

// withoutUserinfo replaces what comes before an address's last '@' (after
// any scheme) with <secret>, as apiRedact does with URL userinfo.
func withoutUserinfo(a string) string {
	at := strings.LastIndex(a, "@")
	if at < 0 {
		return a
	}
	scheme := ""
	if i := strings.Index(a[:at], "://"); i >= 0 {
		scheme = a[:i+3]
	}
	return scheme + "<secret>@" + a[at+1:]
}

func splitJoined(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// parseNetwork accepts a CIDR or a single address.
func parseNetwork(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}
