package upstreams

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
)

// OAUTHBEARER: a server quoting the initial response as sent.
func TestSMTP_OAuthBearerResponseAsSentIsRedacted(t *testing.T) {
	t.Parallel()
	const access = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
	tok := issuing(t, access)
	addr := rawSMTP(t, "OAUTHBEARER", func(raw, _ string) string { return "454 4.7.0 temporary failure for " + raw })
	u := newOAuthSMTP(t, addr, AuthOAuthBearer, OAuth2{TokenURL: tok.URL, ClientID: testClientID, ClientSecret: testClientSecret}, Deps{})
	_, err := u.Send(context.Background(), oauthMsg(0))
	if err == nil {
		t.Fatal("delivered")
	}
	// the token's base64 inside the IR, at any alignment: decode the reason's b64 run
	s := err.Error()
	for _, f := range strings.Fields(s) {
		if d, e := base64.StdEncoding.DecodeString(f); e == nil && strings.Contains(string(d), access) {
			t.Errorf("reason carries the OAUTHBEARER initial response (the token, base64): %s", s)
		}
	}
}

// LOGIN: a server quoting a password shorter than apiMinSecretLen,
// decoded and as sent: 8 characters or more are replaced.
func TestSMTP_ShortPasswordIsRedacted(t *testing.T) {
	t.Parallel()
	const pw = "Tr0ub4dor&3" // 11 chars
	addr := rawSMTP(t, "LOGIN", func(raw, cred string) string {
		return "535 5.7.8 bad password " + cred + " (" + raw + ")"
	})
	err := sendWithPassword(t, addr, AuthLogin, pw)
	if err == nil {
		t.Fatal("delivered")
	}
	if s := err.Error(); strings.Contains(s, pw) || strings.Contains(s, base64.StdEncoding.EncodeToString([]byte(pw))) {
		t.Errorf("password (11 characters) in the reason: %s", s)
	}
}
