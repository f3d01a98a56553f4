package upstreams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
	"golang.org/x/oauth2/jwt"
)

// Default token endpoints and scopes of the providers relaycar knows.
const (
	// googleTokenURL is Google's OAuth 2.0 token endpoint, used for the
	// refresh-token grant when oauth2.token_url is empty (a service
	// account's key file names its own).
	googleTokenURL = "https://oauth2.googleapis.com/token"
	// scopeExchangeSMTP is what Exchange Online SMTP AUTH needs with the
	// client-credentials grant (the app holds SMTP.SendAsApp).
	scopeExchangeSMTP = "https://outlook.office365.com/.default"
	// scopeGmail is the one scope Gmail's SMTP server accepts.
	scopeGmail = "https://mail.google.com/"
	// scopeGraph asks for the Graph application permissions granted
	// to the app (Mail.Send).
	scopeGraph = "https://graph.microsoft.com/.default"
)

// tokenEarly is how long before its expiry a token is replaced, so a token
// never runs out between the fetch and the server checking it.
const tokenEarly = time.Minute

// OAuth2 is an smtp upstream's `oauth2:` block: where its access tokens
// come from. Exactly one grant is configured: a client secret (client
// credentials, Microsoft Entra ID), a Google service account key (JWT
// bearer grant with domain-wide delegation, subject = username) or a
// refresh token (a mailbox whose owner consented once).
type OAuth2 struct {
	TokenURL           string   `yaml:"token_url"`
	ClientID           string   `yaml:"client_id"`
	ClientSecret       Secret   `yaml:"client_secret"`
	ClientSecretFile   string   `yaml:"client_secret_file"`
	Scopes             []string `yaml:"scopes"`
	ServiceAccountFile string   `yaml:"service_account_file"`
	RefreshTokenFile   string   `yaml:"refresh_token_file"`

	// ServiceAccountKey and RefreshToken are read from their files by
	// ResolveSecrets; they are never YAML keys.
	ServiceAccountKey Secret `yaml:"-"`
	RefreshToken      Secret `yaml:"-"`
}

// set reports whether any key of the block was given.
func (o *OAuth2) set() bool {
	return o.TokenURL != "" || o.ClientID != "" || o.ClientSecret != "" || o.ClientSecretFile != "" ||
		len(o.Scopes) > 0 || o.ServiceAccountFile != "" || o.RefreshTokenFile != ""
}

// grant names the configured grant, "" if none or more than one.
func (o *OAuth2) grant() grantKind {
	var gs []grantKind
	// With a refresh token the client secret is the OAuth client's own
	// (Google's refresh grant needs it), not a grant of its own.
	if (o.ClientSecret != "" || o.ClientSecretFile != "") && o.RefreshTokenFile == "" {
		gs = append(gs, grantClientCredentials)
	}
	if o.ServiceAccountFile != "" {
		gs = append(gs, grantServiceAccount)
	}
	if o.RefreshTokenFile != "" {
		gs = append(gs, grantRefreshToken)
	}
	if len(gs) != 1 {
		return ""
	}
	return gs[0]
}

type grantKind string

const (
	grantClientCredentials grantKind = "client credentials"
	grantServiceAccount    grantKind = "service account"
	grantRefreshToken      grantKind = "refresh token"
)

// validate reports the block's problems under path ("oauth2").
func (o *OAuth2) validate(username string, bad badFunc) {
	var n int
	clientCreds := (o.ClientSecret != "" || o.ClientSecretFile != "") && o.RefreshTokenFile == ""
	for _, set := range []bool{clientCreds, o.ServiceAccountFile != "", o.RefreshTokenFile != ""} {
		if set {
			n++
		}
	}
	switch {
	case n == 0:
		bad("oauth2", "set one grant: client_secret_file (client credentials), service_account_file (Google service account) or refresh_token_file")
		return
	case n > 1:
		bad("oauth2", "set only one of client_secret_file, service_account_file and refresh_token_file")
		return
	}
	switch o.grant() {
	case grantClientCredentials:
		if o.TokenURL == "" {
			bad("oauth2.token_url", "required for the client credentials grant (https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token)")
		}
		if o.ClientID == "" {
			bad("oauth2.client_id", "required for the client credentials grant")
		}
	case grantServiceAccount:
		if o.ClientID != "" || o.ClientSecret != "" || o.ClientSecretFile != "" {
			bad("oauth2.client_id", "not used with service_account_file (the key file names its client)")
		}
		if username == "" {
			bad("username", "required with service_account_file: the mailbox the service account acts for")
		}
		if o.ServiceAccountKey != "" {
			if _, err := parseServiceAccount(o.ServiceAccountKey); err != nil {
				bad("oauth2.service_account_file", "%v", err)
			}
		}
	case grantRefreshToken:
		if o.ClientID == "" {
			bad("oauth2.client_id", "required for the refresh token grant (the OAuth client the token was issued to)")
		}
	}
	if o.TokenURL != "" {
		validateURL("oauth2.token_url", o.TokenURL, bad)
	}
}

// validateURL reports a value that is not an absolute http(s) URL without
// echoing it (it may carry credentials).
func validateURL(key, v string, bad badFunc) {
	if u, err := url.Parse(v); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad(key, "must be an absolute http:// or https:// URL")
	}
}

// parseServiceAccount reads a Google service account key file (the JSON
// the Cloud console downloads) into a JWT-bearer grant. It is the few
// fields x/oauth2/google would read, without that package's dependency on
// the GCE metadata client. Errors name fields, never key material.
func parseServiceAccount(key Secret) (*jwt.Config, error) {
	var f struct {
		Type         string `json:"type"`
		ClientEmail  string `json:"client_email"`
		PrivateKeyID string `json:"private_key_id"`
		PrivateKey   string `json:"private_key"`
		TokenURI     string `json:"token_uri"`
	}
	if err := json.Unmarshal([]byte(key.Reveal()), &f); err != nil {
		return nil, errors.New("not a JSON key file")
	}
	switch {
	case f.Type != "service_account":
		return nil, fmt.Errorf("type is %q, want service_account (a key file of a service account)", truncate(f.Type, 40))
	case f.ClientEmail == "":
		return nil, errors.New("client_email missing")
	case !strings.Contains(f.PrivateKey, "PRIVATE KEY"):
		return nil, errors.New("private_key missing or not PEM")
	}
	tokenURL := f.TokenURI
	if tokenURL == "" {
		tokenURL = googleTokenURL
	}
	return &jwt.Config{Email: f.ClientEmail, PrivateKey: []byte(f.PrivateKey), PrivateKeyID: f.PrivateKeyID, TokenURL: tokenURL}, nil
}

// tokenSource fetches access tokens for one upstream and caches the
// current one: concurrent deliveries share one request, a token is
// replaced a minute before it expires, and a token the server refused is
// dropped so the next call fetches a new one.
type tokenSource struct {
	upstream string
	fetch    func(ctx context.Context) (*oauth2.Token, error)
	now      func() time.Time
	secrets  []Secret

	// sem is a one-slot lock that a waiting delivery can give up on when
	// its context ends; it guards tok.
	sem chan struct{}
	tok *oauth2.Token

	// known is secrets plus the access tokens handed out, for redaction
	// outside sem (a server's reply may quote the token it was given).
	known atomic.Pointer[[]Secret]
	prev  string // the access token before the current one; under sem
}

// newTokenSource builds the grant of o for username. client carries the
// timeout and the response bound; scopes default per grant.
func newTokenSource(upstream string, o OAuth2, username string, defaultScopes []string, client *http.Client, now func() time.Time) (*tokenSource, error) {
	scopes := o.Scopes
	if len(scopes) == 0 {
		scopes = defaultScopes
	}
	ts := &tokenSource{upstream: upstream, now: now, sem: make(chan struct{}, 1),
		secrets: []Secret{o.ClientSecret, o.RefreshToken}}
	withClient := func(ctx context.Context) context.Context {
		return context.WithValue(ctx, oauth2.HTTPClient, client)
	}
	switch o.grant() {
	case grantClientCredentials:
		cc := &clientcredentials.Config{ClientID: o.ClientID, ClientSecret: o.ClientSecret.Reveal(), TokenURL: o.TokenURL, Scopes: scopes}
		ts.fetch = func(ctx context.Context) (*oauth2.Token, error) { return cc.Token(withClient(ctx)) }
	case grantServiceAccount:
		jc, err := parseServiceAccount(o.ServiceAccountKey)
		if err != nil {
			return nil, fmt.Errorf("oauth2.service_account_file: %w", err)
		}
		jc.Subject, jc.Scopes = username, scopes
		if o.TokenURL != "" {
			jc.TokenURL = o.TokenURL
		}
		ts.secrets = append(ts.secrets, o.ServiceAccountKey)
		// A fresh source per fetch: jwt's own caches and cannot be told
		// that the server refused its token.
		ts.fetch = func(ctx context.Context) (*oauth2.Token, error) { return jc.TokenSource(withClient(ctx)).Token() }
	case grantRefreshToken:
		tokenURL := o.TokenURL
		if tokenURL == "" {
			tokenURL = googleTokenURL
		}
		oc := &oauth2.Config{ClientID: o.ClientID, ClientSecret: o.ClientSecret.Reveal(),
			Endpoint: oauth2.Endpoint{TokenURL: tokenURL}, Scopes: scopes}
		refresh := o.RefreshToken.Reveal()
		ts.fetch = func(ctx context.Context) (*oauth2.Token, error) {
			t, err := oc.TokenSource(withClient(ctx), &oauth2.Token{RefreshToken: refresh}).Token()
			if err == nil && t.RefreshToken != "" && t.RefreshToken != refresh {
				// Microsoft rotates refresh tokens; keep using the newest
				// for this process (the file is the operator's to update).
				refresh = t.RefreshToken
				ts.secrets = append(ts.secrets, Secret(refresh))
				ts.learn()
			}
			return t, err
		}
	default:
		return nil, errors.New("oauth2: set exactly one grant")
	}
	ts.learn()
	return ts, nil
}

// learn publishes secrets and the access tokens to Secrets: the current
// one and the one before it, which a delivery that began before the
// refresh may still be using. Called under sem, or before ts is shared.
func (ts *tokenSource) learn() {
	k := slices.Clone(ts.secrets)
	if ts.tok != nil {
		if ts.prev != "" && ts.prev != ts.tok.AccessToken {
			k = append(k, Secret(ts.prev))
		}
		k = append(k, Secret(ts.tok.AccessToken))
		ts.prev = ts.tok.AccessToken
	}
	ts.known.Store(&k)
}

// Secrets is what must not appear in a reason: the grant's secrets and
// the access tokens in use. Callers may append to it.
func (ts *tokenSource) Secrets() []Secret {
	if k := ts.known.Load(); k != nil {
		return (*k)[:len(*k):len(*k)]
	}
	return nil
}

// Token returns a valid access token, fetching one if the cached one is
// missing or about to expire. The error is an *Error: ProviderFault when
// the endpoint refused the credentials, Transient when it could not be
// asked.
func (ts *tokenSource) Token(ctx context.Context) (string, error) {
	tok, _, err := ts.token(ctx)
	return tok, err
}

// token is Token that also says whether the token was fetched just now:
// a server refusing a fresh token will refuse the next one too.
func (ts *tokenSource) token(ctx context.Context) (access string, fresh bool, err error) {
	select {
	case ts.sem <- struct{}{}:
	case <-ctx.Done():
		return "", false, errorf(ts.upstream, contextClass(ctx.Err(), false), "", ctx.Err(), "oauth2: waiting for the token request: %v", context.Cause(ctx))
	}
	defer func() { <-ts.sem }()
	if t := ts.tok; t != nil && (t.Expiry.IsZero() || ts.now().Add(tokenEarly).Before(t.Expiry)) {
		return t.AccessToken, false, nil
	}
	t, err := ts.fetch(ctx)
	if err != nil {
		return "", false, ts.fetchError(ctx, err)
	}
	if t.AccessToken == "" {
		return "", false, errorf(ts.upstream, ProviderFault, "", nil, "oauth2: token endpoint answered without an access_token")
	}
	ts.tok = t
	ts.learn()
	return t.AccessToken, true, nil
}

// Invalidate drops access if it is the cached token, after a server
// refused it (revoked, or a clock skew made it expire early).
func (ts *tokenSource) Invalidate(access string) {
	ts.sem <- struct{}{}
	defer func() { <-ts.sem }()
	if ts.tok != nil && ts.tok.AccessToken == access {
		ts.tok = nil
	}
}

// fetchError classes a failed token request. The reason carries the
// endpoint's status and RFC 6749 error code (invalid_client,
// invalid_grant...) and a cut description, never the request or a token.
func (ts *tokenSource) fetchError(ctx context.Context, err error) *Error {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		if ctx.Err() != nil {
			return errorf(ts.upstream, contextClass(ctx.Err(), false), "", err, "oauth2: token request: %v", context.Cause(ctx))
		}
		var ne net.Error
		if errors.As(err, &ne) {
			return errorf(ts.upstream, Transient, "", err, "oauth2: token endpoint unreachable: %s", redactCut(err.Error(), 200, ts.secrets...))
		}
		if msg := err.Error(); strings.HasPrefix(msg, "oauth2: cannot fetch token:") &&
			(strings.Contains(msg, "unexpected EOF") || strings.Contains(msg, "connection reset")) {
			// x/oauth2's text for a response body that broke off (it wraps
			// the read error with %v; its jwt grant uses the same prefix for
			// an unparsable body, which stays ProviderFault): the endpoint's
			// trouble, not our setup.
			return errorf(ts.upstream, Transient, "", err, "oauth2: token response broke off: %s", redactCut(err.Error(), 200, ts.secrets...))
		}
		return errorf(ts.upstream, ProviderFault, "", err, "oauth2: %s", redactCut(err.Error(), 200, ts.secrets...))
	}
	status := 0
	if re.Response != nil {
		status = re.Response.StatusCode
	}
	code, desc := re.ErrorCode, re.ErrorDescription
	if code == "" {
		// jwt leaves the body unparsed.
		var body struct {
			Error            string `json:"error"`
			ErrorDescription string `json:"error_description"`
		}
		if json.Unmarshal(re.Body, &body) == nil {
			code, desc = body.Error, body.ErrorDescription
		}
	}
	class := ProviderFault
	// temporarily_unavailable is RFC 6749's "try again later", whatever
	// status it comes with.
	if status == http.StatusTooManyRequests || status >= 500 || code == "temporarily_unavailable" {
		class = Transient
	}
	reason := "oauth2: token endpoint refused the credentials: HTTP " + strconv.Itoa(status)
	if code != "" {
		reason += " " + redactCut(code, 64, ts.secrets...)
	}
	if desc != "" {
		// Entra's descriptions ("AADSTS7000215: Invalid client secret
		// provided...") say what to fix; the first line is enough.
		first, _, _ := strings.Cut(desc, "\n")
		reason += ": " + redactCut(first, 200, ts.secrets...)
	}
	if class == Transient {
		reason = strings.Replace(reason, "refused the credentials", "failed", 1)
	}
	e := errorf(ts.upstream, class, strconv.Itoa(status), nil, "%s", reason)
	if re.Response != nil {
		// Entra throttles its token endpoint with 429 and Retry-After:
		// the upstream pauses, as for the provider's own throttling,
		// instead of counting failures against its breaker.
		e.RetryAt = httpRetryAt(status, re.Response.Header, ts.now())
	}
	return e
}
