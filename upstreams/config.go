package upstreams

import (
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"
)

// Secret is a credential from relay.yaml. Its printed, YAML and log forms are
// redacted so a config dump or error can never carry the value.
type Secret string

func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "<secret>"
}

// MarshalYAML redacts the value when a config is printed.
func (s Secret) MarshalYAML() (any, error) { return s.String(), nil }

// LogValue redacts the value in slog output.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Reveal returns the value for the one place that must use it.
func (s Secret) Reveal() string { return string(s) }

// RateLimit is a token bucket per upstream; PerSecond 0 means unlimited.
type RateLimit struct {
	PerSecond float64       `yaml:"per_second"`
	Burst     int           `yaml:"burst"`
	MaxWait   time.Duration `yaml:"max_wait"`
}

// CircuitBreaker opens after Failures consecutive failures for OpenFor.
type CircuitBreaker struct {
	Failures uint32        `yaml:"failures"`
	OpenFor  time.Duration `yaml:"open_for"`
}

// Config is one entry of relay.yaml `upstreams:`. Fields that a type does not
// use must stay empty; Validate says so with the YAML path.
type Config struct {
	Name string `yaml:"name"`
	Type string `yaml:"type"`

	// ses
	Region              string `yaml:"region"`
	AccessKeyID         Secret `yaml:"access_key_id"`
	AccessKeyIDFile     string `yaml:"access_key_id_file"`
	SecretAccessKey     Secret `yaml:"secret_access_key"`
	SecretAccessKeyFile string `yaml:"secret_access_key_file"`
	ConfigurationSet    string `yaml:"configuration_set"`

	// sendgrid, mailgun, smtp2go
	APIKey     Secret `yaml:"api_key"`
	APIKeyFile string `yaml:"api_key_file"`
	Domain     string `yaml:"domain"`

	// Endpoint overrides the provider's API base URL (tests, regions, proxies).
	Endpoint string `yaml:"endpoint"`

	// smtp
	Address      string `yaml:"address"`
	TLS          string `yaml:"tls"`
	CAFile       string `yaml:"ca_file"`
	Username     string `yaml:"username"`
	Password     Secret `yaml:"password"`
	PasswordFile string `yaml:"password_file"`

	// file
	Dir string `yaml:"dir"`

	RateLimit       RateLimit      `yaml:"rate_limit"`
	CircuitBreaker  CircuitBreaker `yaml:"circuit_breaker"`
	MaxMessageBytes int64          `yaml:"max_message_bytes"`
	Timeout         time.Duration  `yaml:"timeout"`
}

// Types lists the accepted values of `type`.
var Types = []string{"ses", "sendgrid", "mailgun", "smtp2go", "smtp", "file"}

// DefaultMaxMessageBytes is each provider's documented limit; 0 means the
// upstream sets none of its own (the listener's limit applies).
func DefaultMaxMessageBytes(typ string) int64 {
	limit, _, _ := providerMaxMessageBytes(typ)
	return limit
}

// providerMaxMessageBytes is the largest raw message a provider takes (0
// for none known), its name and the limit as documented. It is both the
// default and the ceiling of max_message_bytes: above it the relay would
// answer 250 and then dead-letter.
func providerMaxMessageBytes(typ string) (limit int64, provider, documented string) {
	switch typ {
	case "ses":
		// SES counts its 40 MB limit after base64 (4/3 growth), so raw
		// messages above 30 MB cannot pass; 28 MiB leaves room for the
		// request envelope (see sesMaxEncoded).
		return 28 << 20, "SES", "40 MB after base64"
	case "sendgrid":
		return 30 << 20, "SendGrid", "30 MB"
	case "mailgun":
		return 25 << 20, "Mailgun", "25 MB"
	}
	return 0, "", ""
}

// apiKeyForm says what a provider's key looks like, for the message when a
// configured one is too short to be real; "" for types without API keys.
func apiKeyForm(typ, field string) string {
	switch typ + "." + field {
	case "sendgrid.api_key":
		return `a SendGrid API key (those start with "SG." and are about 69 characters)`
	case "smtp2go.api_key":
		return `an SMTP2GO API key (those are "api-" and 32 hex digits)`
	case "mailgun.api_key":
		return "a Mailgun API key"
	case "ses.access_key_id":
		return "an AWS access key ID (those are 20 characters, like AKIA...)"
	case "ses.secret_access_key":
		return "an AWS secret access key (those are 40 characters)"
	}
	return ""
}

// ApplyDefaults fills unset fields with the documented defaults.
func (c *Config) ApplyDefaults() {
	if c.RateLimit.MaxWait == 0 {
		c.RateLimit.MaxWait = time.Second
	}
	if c.RateLimit.PerSecond > 0 && c.RateLimit.Burst == 0 {
		c.RateLimit.Burst = max(1, int(c.RateLimit.PerSecond))
	}
	if c.CircuitBreaker.Failures == 0 {
		c.CircuitBreaker.Failures = 5
	}
	if c.CircuitBreaker.OpenFor == 0 {
		c.CircuitBreaker.OpenFor = 30 * time.Second
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = DefaultMaxMessageBytes(c.Type)
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if c.Type == "smtp" && c.TLS == "" {
		c.TLS = "starttls"
	}
	if c.Type == "mailgun" && c.Region == "" {
		c.Region = "us"
	}
}

// ResolveSecrets reads every `<field>_file` into its field. path is the
// YAML path of this entry, e.g. "upstreams[2]".
func (c *Config) ResolveSecrets(path string) []error {
	var errs []error
	for _, s := range []struct {
		name string
		val  *Secret
		file string
	}{
		{"access_key_id", &c.AccessKeyID, c.AccessKeyIDFile},
		{"secret_access_key", &c.SecretAccessKey, c.SecretAccessKeyFile},
		{"api_key", &c.APIKey, c.APIKeyFile},
		{"password", &c.Password, c.PasswordFile},
	} {
		if s.file == "" {
			continue
		}
		if *s.val != "" {
			errs = append(errs, fmt.Errorf("%s.%s: set only one of %s and %s_file", path, s.name, s.name, s.name))
			continue
		}
		b, err := os.ReadFile(s.file)
		if err != nil {
			// The OS error names the file, never its contents.
			errs = append(errs, fmt.Errorf("%s.%s_file: %v", path, s.name, err))
			continue
		}
		*s.val = Secret(strings.TrimRight(string(b), "\r\n"))
	}
	return errs
}

var (
	nameRE      = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	awsRegionRE = regexp.MustCompile(`^[a-z]{2,}(-[a-z]+)+-[0-9]+$`)
	// The Mailgun SDK refuses an API base that contains a version.
	mailgunVersionRE = regexp.MustCompile(`/v[0-9]+`)
)

// Validate returns every problem of this entry as "path.key: message".
func (c *Config) Validate(path string) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", path, key, fmt.Sprintf(format, args...)))
	}
	required := func(key, val string) {
		if val == "" {
			bad(key, "required for type %s", c.Type)
		}
	}
	unused := func(key string, set bool) {
		if set {
			bad(key, "not used by type %s", c.Type)
		}
	}
	switch {
	case c.Name == "":
		bad("name", "required")
	case !nameRE.MatchString(c.Name):
		bad("name", "%q: use letters, digits, '-', '_' and '.'", c.Name)
	}
	isAPI := false
	switch c.Type {
	case "ses":
		required("region", c.Region)
		if c.Region != "" && !awsRegionRE.MatchString(c.Region) {
			bad("region", "%q: not an AWS region name (like us-east-1)", c.Region)
		}
		if (c.AccessKeyID == "") != (c.SecretAccessKey == "") {
			bad("secret_access_key", "set both access_key_id and secret_access_key, or neither for the default AWS credential chain")
		}
		isAPI = true
	case "sendgrid", "smtp2go":
		required("api_key", string(c.APIKey))
		isAPI = true
	case "mailgun":
		required("api_key", string(c.APIKey))
		required("domain", c.Domain)
		if c.Region != "us" && c.Region != "eu" {
			bad("region", "%q: must be us or eu", c.Region)
		}
		isAPI = true
	case "smtp":
		required("address", c.Address)
		if _, port, err := net.SplitHostPort(c.Address); c.Address != "" && (err != nil || port == "") {
			bad("address", "%q: want host:port (587 for STARTTLS, 465 for implicit TLS)", c.Address)
		}
		switch c.TLS {
		case "starttls", "implicit", "none":
		default:
			bad("tls", "%q: must be starttls, implicit or none", c.TLS)
		}
		if (c.Username == "") != (c.Password == "") {
			bad("password", "set both username and password, or neither")
		}
	case "file":
		required("dir", c.Dir)
	case "":
		bad("type", "required (one of %s)", strings.Join(Types, ", "))
	default:
		bad("type", "%q: must be one of %s", c.Type, strings.Join(Types, ", "))
	}
	if c.Type != "" {
		unused("address", c.Address != "" && c.Type != "smtp")
		unused("dir", c.Dir != "" && c.Type != "file")
		unused("domain", c.Domain != "" && c.Type != "mailgun")
		unused("endpoint", c.Endpoint != "" && !isAPI)
		if c.Endpoint != "" && isAPI {
			if u, err := url.Parse(c.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				bad("endpoint", "must be an absolute http:// or https:// URL") // value not echoed: it may carry proxy credentials
			} else if c.Type == "mailgun" && mailgunVersionRE.MatchString(c.Endpoint) {
				bad("endpoint", "give the Mailgun API base without the version (no /v3)")
			}
		}
		unused("api_key", c.APIKey != "" && c.Type != "sendgrid" && c.Type != "mailgun" && c.Type != "smtp2go")
	}
	if c.RateLimit.PerSecond < 0 {
		bad("rate_limit.per_second", "must not be negative")
	}
	if c.RateLimit.Burst < 0 {
		bad("rate_limit.burst", "must not be negative")
	}
	if c.MaxMessageBytes < 0 {
		bad("max_message_bytes", "must not be negative")
	}
	if limit, provider, documented := providerMaxMessageBytes(c.Type); limit > 0 && c.MaxMessageBytes > limit {
		bad("max_message_bytes", "%d is above %s's limit of %s (%d bytes)", c.MaxMessageBytes, provider, documented, limit)
	}
	// Refuse only what cannot be a real key: a truncated paste or a
	// placeholder fails every send, and apiRedact matches secrets by value
	// only from apiMinSecretLen on. Neither the value nor its length is
	// echoed.
	for _, f := range []struct {
		key string
		val Secret
	}{{"access_key_id", c.AccessKeyID}, {"secret_access_key", c.SecretAccessKey}, {"api_key", c.APIKey}} {
		if form := apiKeyForm(c.Type, f.key); form != "" && f.val != "" && len(f.val.Reveal()) < apiMinSecretLen {
			bad(f.key, "too short to be %s", form)
		}
	}
	if c.Timeout < 0 {
		bad("timeout", "must not be negative")
	}
	return errs
}
