package upstreams

import (
	"slices"
	"strings"
	"testing"
)

// Above a provider's hard limit the relay would answer 250 and then
// dead-letter; `relaycar check` refuses it instead.
func TestConfig_MaxMessageBytesAboveProviderLimit(t *testing.T) {
	t.Parallel()
	keys := map[string]Config{
		"ses":      {Region: "us-east-1"},
		"sendgrid": {APIKey: sgTestKey},
		"mailgun":  {APIKey: mailgunTestKey, Domain: mailgunTestDomain, Region: "us"},
		"smtp2go":  {APIKey: smtp2goTestKey},
		"smtp":     {Address: "smtp.example.com:587", TLS: "starttls"},
	}
	for _, tc := range []struct {
		typ  string
		max  int64
		want string // "" = valid
	}{
		{"sendgrid", 52428800, "upstreams[1].max_message_bytes: 52428800 is above SendGrid's limit of 30 MB (31457280 bytes)"},
		{"sendgrid", 31457280, ""},
		{"ses", 29360129, "upstreams[1].max_message_bytes: 29360129 is above SES's limit of 40 MB after base64 (29360128 bytes)"},
		{"ses", 29360128, ""},
		{"mailgun", 26214401, "upstreams[1].max_message_bytes: 26214401 is above Mailgun's limit of 25 MB (26214400 bytes)"},
		{"mailgun", 10 << 20, ""},
		{"smtp2go", 100 << 20, ""}, // no documented limit
		{"smtp", 100 << 20, ""},
	} {
		c := keys[tc.typ]
		c.Name, c.Type, c.MaxMessageBytes = "u", tc.typ, tc.max
		got := errStrings(c.Validate("upstreams[1]"))
		if tc.want == "" && len(got) != 0 || tc.want != "" && !slices.Contains(got, tc.want) {
			t.Errorf("%s max %d: problems %q, want %q", tc.typ, tc.max, got, tc.want)
		}
	}
	// The defaults are the limits, so a config that sets nothing is valid.
	for typ, c := range keys {
		c.Name, c.Type = "u", typ
		c.ApplyDefaults()
		if got := errStrings(c.Validate("upstreams[0]")); len(got) != 0 {
			t.Errorf("%s with defaults: %q", typ, got)
		}
		if limit, _, _ := providerMaxMessageBytes(typ); c.MaxMessageBytes != limit {
			t.Errorf("%s: default %d, limit %d", typ, c.MaxMessageBytes, limit)
		}
	}
}

// A key too short to be real (a placeholder, a truncated paste) is refused
// with its YAML path; neither its value nor its length is printed.
func TestConfig_ShortSecretsRefused(t *testing.T) {
	t.Parallel()
	const short = "k3y-9"
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{Config{Type: "sendgrid", APIKey: short}, `upstreams[2].api_key: too short to be a SendGrid API key (those start with "SG." and are about 69 characters)`},
		{Config{Type: "smtp2go", APIKey: short}, `upstreams[2].api_key: too short to be an SMTP2GO API key (those are "api-" and 32 hex digits)`},
		{Config{Type: "mailgun", APIKey: short, Domain: mailgunTestDomain, Region: "eu"}, "upstreams[2].api_key: too short to be a Mailgun API key"},
		{Config{Type: "ses", Region: "us-east-1", AccessKeyID: short, SecretAccessKey: sesTestSecret},
			"upstreams[2].access_key_id: too short to be an AWS access key ID (those are 20 characters, like AKIA...)"},
		{Config{Type: "ses", Region: "us-east-1", AccessKeyID: sesTestKeyID, SecretAccessKey: short},
			"upstreams[2].secret_access_key: too short to be an AWS secret access key (those are 40 characters)"},
	} {
		tc.c.Name = "u"
		got := errStrings(tc.c.Validate("upstreams[2]"))
		if !slices.Contains(got, tc.want) {
			t.Errorf("%s: problems %q, want %q", tc.c.Type, got, tc.want)
		}
		for _, g := range got {
			if strings.Contains(g, short) || strings.Contains(g, "5 characters") {
				t.Errorf("problem echoes the secret or its length: %s", g)
			}
		}
	}
	// Realistic keys, and passwords of any length (SMTP has no key form).
	for _, c := range []Config{
		{Type: "sendgrid", APIKey: "SG.dummy-key-for-tests"},
		{Type: "smtp2go", APIKey: smtp2goTestKey},
		{Type: "mailgun", APIKey: "key-dummy-for-tests", Domain: mailgunTestDomain, Region: "us"},
		{Type: "ses", Region: "us-east-1", AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
		{Type: "smtp", Address: "smtp.example.com:587", TLS: "starttls", Username: "u", Password: "p"},
	} {
		c.Name = "u"
		if got := errStrings(c.Validate("upstreams[0]")); len(got) != 0 {
			t.Errorf("%s: %q", c.Type, got)
		}
	}
}

func errStrings(errs []error) []string {
	var out []string
	for _, e := range errs {
		out = append(out, e.Error())
	}
	return out
}
