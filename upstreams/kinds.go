package upstreams

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// kindName is the value of an upstream's `type`.
type kindName string

// The accepted kinds, in the order typeNames and the messages list them.
const (
	kindSES      kindName = "ses"
	kindSendGrid kindName = "sendgrid"
	kindMailgun  kindName = "mailgun"
	kindSMTP2GO  kindName = "smtp2go"
	kindSMTP     kindName = "smtp"
	kindFile     kindName = "file"
	kindMSGraph  kindName = "msgraph"
)

// TLSMode is the `tls` of an smtp upstream.
type TLSMode string

// The accepted TLS modes.
const (
	TLSStartTLS TLSMode = "starttls"
	TLSImplicit TLSMode = "implicit"
	TLSNone     TLSMode = "none"
)

// kind is everything the package knows about one provider kind. typeNames,
// defaultMaxMessageBytes, ApplyDefaults, Validate and New read it; nothing
// else switches on the type string.
type kind struct {
	name kindName
	// new builds the adapter from a config that passed prepare (New) or
	// Validate (the relay); it re-checks nothing.
	new func(Config, Deps) (Upstream, error)
	// limit is the largest raw message the provider takes: the default
	// and the ceiling of max_message_bytes. Zero bytes means none known.
	limit providerLimit
	// required are checked first, in order, as "required for type X".
	required []field
	// uses are the per-kind fields (see perKindFields) this kind reads;
	// the others must stay empty.
	uses []field
	// keyForms says what each secret looks like, for the message when a
	// configured one is too short to be real.
	keyForms map[string]string
	// defaults fills this kind's own unset fields; may be nil.
	defaults func(*Config)
	// check reports this kind's problems after the required fields; may be nil.
	check func(c *Config, bad badFunc)
	// checkEndpoint reports a problem of a well-formed endpoint URL; may be nil.
	checkEndpoint func(endpoint string) string
}

type providerLimit struct {
	bytes                int64
	provider, documented string
}

type badFunc func(key, format string, args ...any)

// field is a Config field by its YAML key.
type field struct {
	key string
	get func(*Config) string
}

var (
	fAddress  = field{"address", func(c *Config) string { return c.Address }}
	fAPIKey   = field{"api_key", func(c *Config) string { return string(c.APIKey) }}
	fDir      = field{"dir", func(c *Config) string { return c.Dir }}
	fDomain   = field{"domain", func(c *Config) string { return c.Domain }}
	fEndpoint = field{"endpoint", func(c *Config) string { return c.Endpoint }}
	fRegion   = field{"region", func(c *Config) string { return c.Region }}
	fAuth     = field{"auth", func(c *Config) string { return string(c.Auth) }}
	fOAuth2   = field{"oauth2", func(c *Config) string { return ifSet(c.OAuth2.set()) }}
	fTenantID = field{"tenant_id", func(c *Config) string { return c.TenantID }}
	fClientID = field{"client_id", func(c *Config) string { return c.ClientID }}
	fSecret   = field{"client_secret", func(c *Config) string { return string(c.ClientSecret) }}
	fTokenURL = field{"token_url", func(c *Config) string { return c.TokenURL }}
	fSender   = field{"sender", func(c *Config) string { return c.Sender }}
	fSaveSent = field{"save_to_sent_items", func(c *Config) string { return ifSet(c.SaveToSentItems) }}
)

func ifSet(b bool) string {
	if b {
		return "set"
	}
	return ""
}

// perKindFields are the fields Validate reports as "not used by type X"
// when a kind does not list them in uses, in this order.
var perKindFields = []field{fAddress, fDir, fDomain, fEndpoint, fAPIKey, fAuth, fOAuth2,
	fTenantID, fClientID, fSecret, fTokenURL, fSender, fSaveSent}

// kinds is the one table of provider kinds. It is written once, at package
// initialisation, and only ever read: nothing appends to it, assigns an
// entry or changes a field, so it is a constant that Go cannot spell, not
// state. A slice and not a map because typeNames and the messages list the
// kinds in this order.
var kinds = []kind{
	{
		name: kindSES,
		new:  adapter(newSES),
		// SES counts its 40 MB limit after base64 (4/3 growth), so raw
		// messages above 30 MB cannot pass; 28 MiB leaves room for the
		// request envelope (see sesMaxEncoded).
		limit:    providerLimit{28 << 20, "SES", "40 MB after base64"},
		required: []field{fRegion},
		uses:     []field{fEndpoint},
		keyForms: map[string]string{
			"access_key_id":     "an AWS access key ID (those are 20 characters, like AKIA...)",
			"secret_access_key": "an AWS secret access key (those are 40 characters)",
		},
		check: func(c *Config, bad badFunc) {
			if c.Region != "" && !awsRegionRE.MatchString(c.Region) {
				bad("region", "%q: not an AWS region name (like us-east-1)", c.Region)
			}
			if (c.AccessKeyID == "") != (c.SecretAccessKey == "") {
				bad("secret_access_key", "set both access_key_id and secret_access_key, or neither for the default AWS credential chain")
			}
		},
	},
	{
		name:     kindSendGrid,
		new:      adapter(newSendGrid),
		limit:    providerLimit{sendGridMaxBytes, "SendGrid", "30 MB"},
		required: []field{fAPIKey},
		uses:     []field{fEndpoint, fAPIKey},
		keyForms: map[string]string{"api_key": `a SendGrid API key (those start with "SG." and are about 69 characters)`},
	},
	{
		name:     kindMailgun,
		new:      adapter(newMailgun),
		limit:    providerLimit{25 << 20, "Mailgun", "25 MB"},
		required: []field{fAPIKey, fDomain},
		uses:     []field{fDomain, fEndpoint, fAPIKey},
		keyForms: map[string]string{"api_key": "a Mailgun API key"},
		defaults: func(c *Config) {
			if c.Region == "" {
				c.Region = "us"
			}
		},
		check: func(c *Config, bad badFunc) {
			if c.Region != "us" && c.Region != "eu" {
				bad("region", "%q: must be us or eu", c.Region)
			}
		},
		checkEndpoint: func(endpoint string) string {
			if mailgunVersionRE.MatchString(endpoint) {
				return "give the Mailgun API base without the version (no /v3)"
			}
			return ""
		},
	},
	{
		name:     kindSMTP2GO,
		new:      adapter(newSMTP2GO),
		required: []field{fAPIKey},
		uses:     []field{fEndpoint, fAPIKey},
		keyForms: map[string]string{"api_key": `an SMTP2GO API key (those are "api-" and 32 hex digits)`},
	},
	{
		name:     kindSMTP,
		new:      adapter(newSMTP),
		required: []field{fAddress},
		uses:     []field{fAddress, fAuth, fOAuth2},
		defaults: func(c *Config) {
			if c.TLS == "" {
				c.TLS = TLSStartTLS
			}
			if c.Auth == "" && c.OAuth2.set() {
				c.Auth = AuthXOAuth2
			}
		},
		check: func(c *Config, bad badFunc) {
			if _, port, err := net.SplitHostPort(c.Address); c.Address != "" && (err != nil || port == "") {
				bad("address", "%q: want host:port (587 for STARTTLS, 465 for implicit TLS)", c.Address)
			}
			switch c.TLS {
			case TLSStartTLS, TLSImplicit, TLSNone:
			default:
				bad("tls", "%q: must be starttls, implicit or none", c.TLS)
			}
			validateSMTPAuth(c, bad)
		},
	},
	{
		name: kindMSGraph,
		new:  adapter(newMSGraph),
		// Graph takes a sendMail request of up to 4 MB; the base64 of the
		// MIME message must fit (see msgraphMaxBytes).
		limit:    providerLimit{msgraphMaxBytes, "Microsoft Graph", "4 MB per sendMail request, after base64"},
		required: []field{fClientID, fSecret},
		uses:     []field{fEndpoint, fTenantID, fClientID, fSecret, fTokenURL, fSender, fSaveSent},
		check: func(c *Config, bad badFunc) {
			if c.TenantID == "" && c.TokenURL == "" {
				bad("tenant_id", "required for type msgraph (or token_url)")
			}
			if c.TokenURL != "" {
				validateURL("token_url", c.TokenURL, bad)
			}
			if c.Sender != "" && !strings.Contains(c.Sender, "@") {
				bad("sender", "%q: want the mailbox address (user principal name) to send as", c.Sender)
			}
		},
	},
	{
		name:     kindFile,
		new:      adapter(newFile),
		required: []field{fDir},
		uses:     []field{fDir},
	},
}

// adapter turns a provider's typed constructor into the table's, keeping
// a failed build a nil Upstream rather than a typed nil.
func adapter[T Upstream](f func(Config, Deps) (T, error)) func(Config, Deps) (Upstream, error) {
	return func(c Config, d Deps) (Upstream, error) {
		u, err := f(c, d)
		if err != nil {
			return nil, err
		}
		return u, nil
	}
}

// lookupKind returns the table entry for typ; the zero kind (no fields,
// no limit, no constructor) and false for an unknown one.
func lookupKind(typ string) (kind, bool) {
	for _, k := range kinds {
		if string(k.name) == typ {
			return k, true
		}
	}
	return kind{}, false
}

func (k kind) usesField(f field) bool {
	for _, u := range k.uses {
		if u.key == f.key {
			return true
		}
	}
	return false
}

// validate reports the kind's own problems: its required fields, then its
// extra checks.
func (k kind) validate(c *Config, bad badFunc) {
	for _, f := range k.required {
		if f.get(c) == "" {
			bad(f.key, "required for type %s", c.Type)
		}
	}
	if k.check != nil {
		k.check(c, bad)
	}
}

// validateEndpoint reports a malformed endpoint override of a kind that
// uses one. The value is never echoed: it may carry proxy credentials.
func (k kind) validateEndpoint(c *Config, bad badFunc) {
	if c.Endpoint == "" || !k.usesField(fEndpoint) {
		return
	}
	if u, err := url.Parse(c.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("endpoint", "must be an absolute http:// or https:// URL")
	} else if k.checkEndpoint != nil {
		if problem := k.checkEndpoint(c.Endpoint); problem != "" {
			bad("endpoint", "%s", problem)
		}
	}
}

// build is New without the upstream name on the error: the documented
// defaults, the kind's own checks (what a constructor relies on), then
// the kind's constructor. It leaves out the checks that only protect the
// operator (names, size ceilings, key lengths), so an embedder or a test
// may still build an adapter that `relaycar check` would refuse.
func build(c Config, d Deps) (Upstream, error) {
	k, ok := lookupKind(c.Type)
	if !ok {
		return nil, fmt.Errorf("type %q is not supported", c.Type)
	}
	c.ApplyDefaults()
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	k.validate(&c, bad)
	k.validateEndpoint(&c, bad)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return k.new(c, d)
}

// validateSMTPAuth checks that the credentials fit the mechanism: a
// password for PLAIN and LOGIN, an oauth2 block and a username (the
// mailbox) for the token mechanisms, never both.
func validateSMTPAuth(c *Config, bad badFunc) {
	switch c.Auth {
	case "", AuthPlain, AuthLogin, AuthXOAuth2, AuthOAuthBearer:
	default:
		bad("auth", "%q: must be plain, login, xoauth2 or oauthbearer", c.Auth)
		return
	}
	oauth := c.OAuth2.set()
	switch {
	case oauth && c.Password != "":
		bad("oauth2", "set either password or oauth2, not both")
	case c.Auth == AuthXOAuth2 || c.Auth == AuthOAuthBearer || oauth:
		if c.Auth == AuthPlain || c.Auth == AuthLogin {
			bad("auth", "%s sends a password; with oauth2 use xoauth2 or oauthbearer", c.Auth)
		}
		if c.Username == "" {
			bad("username", "required with oauth2: the mailbox to authenticate as")
		}
		if !oauth {
			bad("oauth2", "required with auth: %s (client_secret_file, service_account_file or refresh_token_file)", c.Auth)
			return
		}
		c.OAuth2.validate(c.Username, bad)
	case c.Auth != "" && c.Password == "":
		bad("password", "required with auth: %s", c.Auth)
	case (c.Username == "") != (c.Password == ""):
		bad("password", "set both username and password, or neither")
	}
}
