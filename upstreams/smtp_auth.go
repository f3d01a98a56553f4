package upstreams

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// smtpOAuthScopes are the scopes asked for when oauth2.scopes is empty:
// Exchange Online for client credentials (the grant Entra ID offers
// daemons), Gmail for a service account, and for a refresh token the
// provider its token endpoint belongs to.
func smtpOAuthScopes(o OAuth2) []string {
	switch o.grant() {
	case grantClientCredentials:
		return []string{scopeExchangeSMTP}
	case grantRefreshToken:
		if strings.Contains(o.TokenURL, "login.microsoftonline.com") {
			return []string{"https://outlook.office.com/SMTP.Send", "offline_access"}
		}
	}
	return []string{scopeGmail}
}

// xoauth2Client is the XOAUTH2 mechanism of Google's and Microsoft's
// documentation, which go-sasl no longer has (go-sasl#18).
type xoauth2Client struct {
	user, token string
	challenged  bool
}

func (a *xoauth2Client) Start() (string, []byte, error) {
	return "XOAUTH2", []byte("user=" + a.user + "\x01auth=Bearer " + a.token + "\x01\x01"), nil
}

// Next answers the one challenge XOAUTH2 has, the server's JSON error,
// with the empty response the mechanism requires; the server then ends
// the exchange with its 535.
func (a *xoauth2Client) Next([]byte) ([]byte, error) {
	if a.challenged {
		return nil, errors.New("xoauth2: unexpected second challenge")
	}
	a.challenged = true
	return []byte{}, nil
}

// authenticate runs AUTH if credentials are configured.
func (s *smtpUpstream) authenticate(ctx context.Context, c *smtp.Client) error {
	if s.username == "" {
		return nil
	}
	if ok, _ := c.Extension("AUTH"); !ok {
		return errorf(s.name, ProviderFault, "", nil, "server does not offer AUTH but credentials are configured")
	}
	mech := s.auth
	switch {
	case mech == AuthXOAuth2 || mech == AuthOAuthBearer:
		return s.authToken(ctx, c)
	case mech != "":
		if !c.SupportsAuth(strings.ToUpper(string(mech))) {
			return errorf(s.name, ProviderFault, "", nil, "server does not offer AUTH %s (auth: %s)", strings.ToUpper(string(mech)), mech)
		}
	case c.SupportsAuth("PLAIN"):
		mech = AuthPlain
	case c.SupportsAuth("LOGIN"):
		mech = AuthLogin
	default:
		return errorf(s.name, ProviderFault, "", nil, "server offers neither AUTH PLAIN nor LOGIN")
	}
	client := sasl.NewPlainClient("", s.username, s.password.Reveal())
	if mech == AuthLogin {
		client = sasl.NewLoginClient(s.username, s.password.Reveal())
	}
	if err := c.Auth(client); err != nil {
		e := s.fail(ctx, phaseAuth, err)
		if basicAuthRetired(err) {
			e.Reason += " (this server no longer takes passwords: use auth: xoauth2 with an oauth2 block)"
		}
		return e
	}
	return nil
}

// authToken authenticates with an OAuth2 access token. A refusal of a
// cached token fetches a fresh one and tries once more on the same
// connection: the token may have been revoked or have expired early. A
// refusal of a token fetched for this very attempt is final.
func (s *smtpUpstream) authToken(ctx context.Context, c *smtp.Client) error {
	mechName := strings.ToUpper(string(s.auth))
	if !c.SupportsAuth(mechName) {
		return errorf(s.name, ProviderFault, "", nil, "server does not offer AUTH %s (auth: %s)", mechName, s.auth)
	}
	host, portStr, _ := net.SplitHostPort(s.addr)
	port, _ := strconv.Atoi(portStr)
	for attempt := 1; ; attempt++ {
		tok, fresh, err := s.tokens.token(ctx)
		if err != nil {
			return err
		}
		var client sasl.Client = &xoauth2Client{user: s.username, token: tok}
		if s.auth == AuthOAuthBearer {
			client = sasl.NewOAuthBearerClient(&sasl.OAuthBearerOptions{Username: s.username, Token: tok, Host: host, Port: port})
		}
		err = c.Auth(client)
		if err == nil {
			return nil
		}
		if !tokenRefused(err) {
			return s.fail(ctx, phaseAuth, err)
		}
		s.tokens.Invalidate(tok)
		if fresh || attempt == 2 {
			e := s.fail(ctx, phaseAuth, err)
			e.Class = ProviderFault
			e.Reason = "auth: " + mechName + " refused a freshly fetched token for " + s.username + ": " + strings.TrimPrefix(e.Reason, "auth: ") +
				" (check the app's permission and the mailbox's service principal)"
			return e
		}
	}
}

// tokenRefused recognises a server's refusal of the token itself (535,
// or an OAUTHBEARER error challenge), as opposed to a broken connection.
func tokenRefused(err error) bool {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code == 535 || se.Code == 534
	}
	var be *sasl.OAuthBearerError
	return errors.As(err, &be)
}

// basicAuthRetired recognises Exchange Online's refusals of password
// authentication: 535 5.7.139 (basic authentication disabled for the
// tenant) and 5.7.30 (not supported for client submission).
func basicAuthRetired(err error) bool {
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		return false
	}
	return se.EnhancedCode == smtp.EnhancedCode{5, 7, 139} || se.EnhancedCode == smtp.EnhancedCode{5, 7, 30}
}
