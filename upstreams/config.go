package upstreams

import (
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/relaycar/relaycar/internal/yamlconf"
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
	// Shared makes the limit one bucket in Redis for every replica: a
	// provider's quota belongs to the account, not to the pod.
	Shared bool `yaml:"shared"`
	// FromProvider caps PerSecond at the provider's own quota and skips
	// the upstream once its 24-hour quota is used (SES only).
	FromProvider bool `yaml:"from_provider"`
}

// SESMaxRecipientsPerCall is how many recipients one SES SendEmail may
// carry; a shared limit's burst must cover it, since redis_rate never
// admits a cost above the burst.
const SESMaxRecipientsPerCall = 50

// CircuitBreaker opens after Failures consecutive failures for OpenFor.
type CircuitBreaker struct {
	Failures uint32        `yaml:"failures"`
	OpenFor  time.Duration `yaml:"open_for"`
}

// AuthMode is the `auth` of an smtp upstream.
type AuthMode string

// The accepted SASL mechanisms.
const (
	AuthPlain       AuthMode = "plain"
	AuthLogin       AuthMode = "login"
	AuthXOAuth2     AuthMode = "xoauth2"
	AuthOAuthBearer AuthMode = "oauthbearer"
)

// HeaderEdits are header fields an upstream's copy gains or loses.
type HeaderEdits struct {
	Add    map[string]string `yaml:"add"`
	Remove []string          `yaml:"remove"`
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
	Address string  `yaml:"address"`
	TLS     TLSMode `yaml:"tls"`
	CAFile  string  `yaml:"ca_file"`
	// CA is ca_file's content, read by ResolveSecrets, so that a reload
	// sees a rotated CA as a changed upstream.
	CA           []byte `yaml:"-"`
	Username     string `yaml:"username"`
	Password     Secret `yaml:"password"`
	PasswordFile string `yaml:"password_file"`
	// Auth picks the SASL mechanism; empty is PLAIN or LOGIN with a
	// password and XOAUTH2 with an oauth2 block.
	Auth   AuthMode `yaml:"auth"`
	OAuth2 OAuth2   `yaml:"oauth2"`

	// msgraph
	TenantID         string `yaml:"tenant_id"`
	ClientID         string `yaml:"client_id"`
	ClientSecret     Secret `yaml:"client_secret"`
	ClientSecretFile string `yaml:"client_secret_file"`
	TokenURL         string `yaml:"token_url"`
	Sender           string `yaml:"sender"`
	SaveToSentItems  bool   `yaml:"save_to_sent_items"`

	// file
	Dir string `yaml:"dir"`

	// RewriteFrom and Headers change this upstream's copy of a message
	// only (any type), so a failover can send the original elsewhere.
	RewriteFrom string      `yaml:"rewrite_from"`
	Headers     HeaderEdits `yaml:"headers"`

	RateLimit       RateLimit      `yaml:"rate_limit"`
	CircuitBreaker  CircuitBreaker `yaml:"circuit_breaker"`
	MaxMessageBytes int64          `yaml:"max_message_bytes"`
	Timeout         time.Duration  `yaml:"timeout"`
}

// typeNames lists the accepted values of `type`, in the order of kinds.
var typeNames = func() []string {
	names := make([]string, len(kinds))
	for i, k := range kinds {
		names[i] = string(k.name)
	}
	return names
}()

// defaultMaxMessageBytes is each provider's documented limit; 0 means the
// upstream sets none of its own (the listener's limit applies).
func defaultMaxMessageBytes(typ string) int64 {
	limit, _, _ := providerMaxMessageBytes(typ)
	return limit
}

// providerMaxMessageBytes is the largest raw message a provider takes (0
// for none known), its name and the limit as documented. It is both the
// default and the ceiling of max_message_bytes: above it the relay would
// answer 250 and then dead-letter.
func providerMaxMessageBytes(typ string) (limit int64, provider, documented string) {
	k, _ := lookupKind(typ)
	return k.limit.bytes, k.limit.provider, k.limit.documented
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
		c.MaxMessageBytes = defaultMaxMessageBytes(c.Type)
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if k, _ := lookupKind(c.Type); k.defaults != nil {
		k.defaults(c)
	}
}

// Files lists the files this entry reads (secrets, CA, OAuth keys), for
// a reload to notice when one changes.
func (c *Config) Files() []string {
	var out []string
	for _, p := range []string{c.AccessKeyIDFile, c.SecretAccessKeyFile, c.APIKeyFile, c.PasswordFile, c.ClientSecretFile, c.CAFile,
		c.OAuth2.ClientSecretFile, c.OAuth2.ServiceAccountFile, c.OAuth2.RefreshTokenFile} {
		if p != "" {
			out = append(out, p)
		}
	}
	return out
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
		{"client_secret", &c.ClientSecret, c.ClientSecretFile},
		{"oauth2.client_secret", &c.OAuth2.ClientSecret, c.OAuth2.ClientSecretFile},
		{"oauth2.service_account", &c.OAuth2.ServiceAccountKey, c.OAuth2.ServiceAccountFile},
		{"oauth2.refresh_token", &c.OAuth2.RefreshToken, c.OAuth2.RefreshTokenFile},
	} {
		if s.file == "" {
			continue
		}
		if *s.val != "" {
			errs = append(errs, yamlconf.FieldError{Path: path + "." + s.name, Msg: fmt.Sprintf("set only one of %s and %s_file", s.name, s.name)})
			continue
		}
		b, err := os.ReadFile(s.file)
		if err != nil {
			// The OS error names the file, never its contents.
			errs = append(errs, yamlconf.FieldError{Path: path + "." + s.name + "_file", Msg: err.Error()})
			continue
		}
		*s.val = Secret(strings.TrimRight(string(b), "\r\n"))
	}
	if c.CAFile != "" {
		b, err := os.ReadFile(c.CAFile)
		if err != nil {
			errs = append(errs, yamlconf.FieldError{Path: path + ".ca_file", Msg: err.Error()})
		} else {
			c.CA = b
		}
	}
	return errs
}

var (
	nameRE      = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	awsRegionRE = regexp.MustCompile(`^[a-z]{2,}(-[a-z]+)+-[0-9]+$`)
	// The Mailgun SDK refuses an API base that contains a version.
	mailgunVersionRE = regexp.MustCompile(`/v[0-9]+`)
)

// Validate returns every problem of this entry, each a yamlconf.FieldError
// whose path is under path.
func (c *Config) Validate(path string) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, yamlconf.FieldError{Path: path + "." + key, Msg: fmt.Sprintf(format, args...)})
	}
	switch {
	case c.Name == "":
		bad("name", "required")
	case !nameRE.MatchString(c.Name):
		bad("name", "%q: use letters, digits, '-', '_' and '.'", c.Name)
	}
	k, known := lookupKind(c.Type)
	switch {
	case c.Type == "":
		bad("type", "required (one of %s)", strings.Join(typeNames, ", "))
	case !known:
		bad("type", "%q: must be one of %s", c.Type, strings.Join(typeNames, ", "))
	default:
		k.validate(c, bad)
	}
	if c.Type != "" {
		for _, f := range perKindFields {
			if f.get(c) != "" && !k.usesField(f) {
				bad(f.key, "not used by type %s", c.Type)
			}
			if f.key == fEndpoint.key {
				k.validateEndpoint(c, bad)
			}
		}
	}
	if c.RateLimit.PerSecond < 0 {
		bad("rate_limit.per_second", "must not be negative")
	}
	if c.RateLimit.Burst < 0 {
		bad("rate_limit.burst", "must not be negative")
	}
	validateFromProvider(c, bad)
	if c.RateLimit.Shared {
		if c.RateLimit.PerSecond <= 0 {
			bad("rate_limit.per_second", "must be positive with shared: true")
		} else if c.Type == "ses" && c.RateLimit.Burst < SESMaxRecipientsPerCall {
			bad("rate_limit.burst", "%d is below %d with shared: true: SES sends up to %d recipients per call and a shared limit never admits more than its burst at once",
				c.RateLimit.Burst, SESMaxRecipientsPerCall, SESMaxRecipientsPerCall)
		}
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
		if form := k.keyForms[f.key]; form != "" && f.val != "" && len(f.val.Reveal()) < apiMinSecretLen {
			bad(f.key, "too short to be %s", form)
		}
	}
	if c.Timeout < 0 {
		bad("timeout", "must not be negative")
	}
	c.validateRewrite(bad)
	return errs
}
