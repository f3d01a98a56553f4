package fakes

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TokenOptions are what a token endpoint fake accepts.
type TokenOptions struct {
	// Client credentials and refresh grants: the registered client.
	ClientID, ClientSecret string
	// RefreshToken is the one refresh token the refresh grant takes.
	RefreshToken string
	// ServiceAccount is the public key and email whose RS256 JWT
	// assertions the jwt-bearer grant takes; Subject is the mailbox the
	// assertion must name.
	ServiceAccount *rsa.PublicKey
	SAEmail        string
	Subject        string
	// Scope is the scope every grant must ask for (space separated).
	Scope string
	// ExpiresIn is the tokens' lifetime in seconds (default 3600).
	ExpiresIn int
	// Fail, when it returns a status, answers request n with it and an
	// RFC 6749 error body instead of a token.
	Fail func(n int) (status int, code, desc string)
	// EchoSecret quotes the client secret it got in invalid_client's
	// description, as a careless endpoint or proxy might: what the relay
	// must keep out of its logs and dead letters.
	EchoSecret bool
}

// TokenServer is a fake OAuth 2.0 token endpoint (RFC 6749 section 4.4
// client credentials, 6 refresh, RFC 7523 JWT bearer) on 127.0.0.1. It
// issues ~2 KB tokens, the size Entra ID's are, and remembers them so a
// fake resource server can check one.
type TokenServer struct {
	URL string
	o   TokenOptions

	mu      sync.Mutex
	n       int
	issued  map[string]time.Time // token → expiry
	grants  []string
	refused []string
}

// NewTokenServer starts the fake; it stops when the test ends.
func NewTokenServer(t testing.TB, o TokenOptions) *TokenServer {
	t.Helper()
	if o.ExpiresIn == 0 {
		o.ExpiresIn = 3600
	}
	ts := &TokenServer{o: o, issued: map[string]time.Time{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("token fake listen: %v", err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(ts.serve))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	ts.URL = srv.URL + "/oauth2/v2.0/token"
	t.Cleanup(srv.Close)
	return ts
}

// Requests is how many token requests arrived, Grants their grant types.
func (ts *TokenServer) Requests() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.n
}

// Grants lists the grant_type of every request, in order.
func (ts *TokenServer) Grants() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]string(nil), ts.grants...)
}

// Refusals lists why requests were refused, in order.
func (ts *TokenServer) Refusals() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]string(nil), ts.refused...)
}

// Valid reports whether tok was issued here and has not expired or been
// revoked.
func (ts *TokenServer) Valid(tok string) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	exp, ok := ts.issued[tok]
	return ok && time.Now().Before(exp)
}

// Issued lists every token issued so far.
func (ts *TokenServer) Issued() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var out []string
	for t := range ts.issued {
		out = append(out, t)
	}
	return out
}

// RevokeAll makes every issued token invalid (a revoked consent, a
// rotated secret on the provider's side).
func (ts *TokenServer) RevokeAll() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for t := range ts.issued {
		ts.issued[t] = time.Time{}
	}
}

func (ts *TokenServer) serve(w http.ResponseWriter, r *http.Request) {
	ts.mu.Lock()
	n := ts.n
	ts.n++
	ts.mu.Unlock()
	fail := func(status int, code, desc string) {
		ts.mu.Lock()
		ts.refused = append(ts.refused, code+": "+desc)
		ts.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]any{"error": code, "error_description": desc, "error_codes": []int{7000215}})
	}
	if r.Method != http.MethodPost || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
		fail(400, "invalid_request", "POST application/x-www-form-urlencoded required")
		return
	}
	if err := r.ParseForm(); err != nil {
		fail(400, "invalid_request", "bad form")
		return
	}
	if ts.o.Fail != nil {
		if status, code, desc := ts.o.Fail(n); status != 0 {
			fail(status, code, desc)
			return
		}
	}
	grant := r.PostForm.Get("grant_type")
	ts.mu.Lock()
	ts.grants = append(ts.grants, grant)
	ts.mu.Unlock()
	id, secret, basic := r.BasicAuth()
	if !basic {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	scope := r.PostForm.Get("scope")
	switch grant {
	case "client_credentials":
		if id != ts.o.ClientID || secret != ts.o.ClientSecret || ts.o.ClientSecret == "" {
			desc := "AADSTS7000215: Invalid client secret provided."
			if ts.o.EchoSecret {
				desc += " Got '" + secret + "'."
			}
			fail(401, "invalid_client", desc)
			return
		}
	case "refresh_token":
		if id != ts.o.ClientID || secret != ts.o.ClientSecret || r.PostForm.Get("refresh_token") != ts.o.RefreshToken || ts.o.RefreshToken == "" {
			fail(400, "invalid_grant", "Token has been expired or revoked.")
			return
		}
	case "urn:ietf:params:oauth:grant-type:jwt-bearer":
		claims, err := verifyJWT(r.PostForm.Get("assertion"), ts.o.ServiceAccount)
		if err != nil {
			fail(400, "invalid_grant", "Invalid JWT Signature: "+err.Error())
			return
		}
		scope, _ = claims["scope"].(string)
		exp, _ := claims["exp"].(float64)
		iat, _ := claims["iat"].(float64)
		switch {
		case claims["iss"] != ts.o.SAEmail:
			fail(401, "invalid_client", "unknown iss")
			return
		case claims["sub"] != ts.o.Subject:
			fail(401, "unauthorized_client", "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.")
			return
		case claims["aud"] != ts.URL:
			fail(400, "invalid_grant", fmt.Sprintf("Invalid JWT: aud %v", claims["aud"]))
			return
		case exp < float64(time.Now().Unix()) || exp-iat > 3600:
			fail(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)")
			return
		}
	default:
		fail(400, "unsupported_grant_type", "grant "+grant)
		return
	}
	// A refresh request may leave scope out (RFC 6749 section 6: the
	// original grant's scope applies).
	if ts.o.Scope != "" && scope != ts.o.Scope && (grant != "refresh_token" || scope != "") {
		fail(400, "invalid_scope", "AADSTS70011: The provided value for the input parameter 'scope' is not valid: "+scope)
		return
	}
	tok := fmt.Sprintf("tok%04d.", n) + randomB64(1500)
	ts.mu.Lock()
	ts.issued[tok] = time.Now().Add(time.Duration(ts.o.ExpiresIn) * time.Second)
	ts.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"token_type": "Bearer", "expires_in": ts.o.ExpiresIn, "access_token": tok})
}

func randomB64(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// verifyJWT checks an RS256 compact JWS against pub and returns its claims.
func verifyJWT(s string, pub *rsa.PublicKey) (map[string]any, error) {
	if pub == nil {
		return nil, fmt.Errorf("no service account registered")
	}
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("not a compact JWS")
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	hb, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(hb, &hdr) != nil || hdr.Alg != "RS256" {
		return nil, fmt.Errorf("header is not RS256")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, fmt.Errorf("signature encoding")
	}
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig); err != nil {
		return nil, fmt.Errorf("signature does not verify")
	}
	pb, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("payload encoding")
	}
	claims := map[string]any{}
	if err := json.Unmarshal(pb, &claims); err != nil {
		return nil, fmt.Errorf("payload is not JSON")
	}
	return claims, nil
}

// ServiceAccountKey returns a Google service account key file (the JSON
// the Cloud console downloads) for email, with a fresh RSA key, and the
// key's public half for the token fake.
func ServiceAccountKey(t testing.TB, email, tokenURI string) ([]byte, *rsa.PublicKey) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(map[string]string{
		"type":           "service_account",
		"project_id":     "relaycar-test",
		"private_key_id": "0123456789abcdef",
		"private_key":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email":   email,
		"client_id":      "104242424242424242424",
		"token_uri":      tokenURI,
	})
	if err != nil {
		t.Fatal(err)
	}
	return b, &key.PublicKey
}
