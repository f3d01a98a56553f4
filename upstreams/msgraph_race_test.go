package upstreams

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// Concurrent Graph failures each append their own token to what
// Secrets() returns: that must be a copy, not the shared slice.
func TestGraph_ConcurrentFailuresRedactTheirOwnToken(t *testing.T) {
	const access = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.abcdefghijklmnopqrstuvwxyz0123456789"
	tok := issuing(t, access)
	graph := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		w.Write([]byte(`{"error":{"code":"ErrorX","message":"nope"}}`))
	}))
	defer graph.Close()
	c := Config{Name: "graph", Type: "msgraph", TenantID: "contoso.example", ClientID: testClientID, ClientSecret: testClientSecret,
		Endpoint: graph.URL, TokenURL: tok.URL, Sender: testMailbox, Timeout: 5 * time.Second}
	c.ApplyDefaults()
	u, err := New(c, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	g := u.(*msgraphUpstream)
	if _, err := g.tokens.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	k := g.tokens.Secrets()
	t.Logf("known: len %d cap %d", len(k), cap(k))
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 5; j++ {
				u.Send(context.Background(), oauthMsg(0))
			}
		}()
	}
	wg.Wait()
}
