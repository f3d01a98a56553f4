package upstreams

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Two deliveries overlap a token refresh: the first still uses T1 when the
// second fetched T2 (T1 is good for up to tokenEarly more), so a reply
// quoting T1 must be redacted too.
func TestOAuth2_TokenBeforeARefreshStaysRedacted(t *testing.T) {
	tokens := []string{
		"eyJhbGciOiJSUzI1NiJ9.T1-first-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		"eyJhbGciOiJSUzI1NiJ9.T2-second-token-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
	}
	var n atomic.Int32
	tok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"access_token":"` + tokens[n.Add(1)-1] + `","token_type":"Bearer","expires_in":3600}`))
	}))
	defer tok.Close()
	var clock atomic.Int64
	base := time.Now()
	now := func() time.Time { return base.Add(time.Duration(clock.Load())) }
	release := make(chan struct{})
	addr := rawSMTP(t, "XOAUTH2", func(raw, cred string) string {
		if strings.Contains(cred, "T1-first") {
			<-release
			return "454 4.7.0 try later, token " + strings.Fields(strings.ReplaceAll(cred, "\x01", " "))[2]
		}
		return "454 4.7.0 try later"
	})
	u := newOAuthSMTP(t, addr, AuthXOAuth2, OAuth2{TokenURL: tok.URL, ClientID: testClientID, ClientSecret: testClientSecret}, Deps{Now: now})
	var wg sync.WaitGroup
	var errA error
	wg.Add(1)
	go func() { defer wg.Done(); _, errA = u.Send(context.Background(), oauthMsg(0)) }()
	for n.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // A is in AUTH with T1
	clock.Store(int64(3590 * time.Second))
	u.Send(context.Background(), oauthMsg(1)) // B fetches T2
	close(release)
	wg.Wait()
	t.Logf("A: %v", errA)
	if errA != nil && strings.Contains(errA.Error(), "T1-first") {
		t.Errorf("T1 in the reason: %v", errA)
	}
}
