package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/relaycar/relaycar/internal/adminapi"
	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/relay/spool"
)

// QueueEntry is one message in GET /api/queue and `relaycar queue ls`.
type QueueEntry struct {
	ID          string    `json:"id"`
	Sender      string    `json:"sender"`
	Recipients  []string  `json:"recipients"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt"`
	LastError   string    `json:"last_error,omitempty"`
	// UpstreamErrors is each upstream's own last error: the 535 behind a
	// last_error that only says the breaker was open.
	UpstreamErrors map[string]string `json:"upstream_errors,omitempty"`
	ReceivedAt     time.Time         `json:"received_at"`
	Size           int               `json:"size"`
	MessageID      string            `json:"message_id"`
	Routes         []RouteState      `json:"routes"`
	Deliveries     []Delivery        `json:"deliveries,omitempty"`
	Failures       []Failure         `json:"failures,omitempty"`
	DeadReason     string            `json:"dead_reason,omitempty"`
	DeadAt         *time.Time        `json:"dead_at,omitempty"`
}

// Entry is the API view of an envelope.
func Entry(e *Envelope) QueueEntry {
	return QueueEntry{ID: e.ID, Sender: e.From, Recipients: e.Rcpts, Attempts: e.Attempts, NextAttempt: e.NextAttempt,
		LastError: e.LastError, UpstreamErrors: e.UpstreamErrors, ReceivedAt: e.ReceivedAt, Size: e.Size, MessageID: e.MessageID, Routes: e.Routes,
		Deliveries: e.Deliveries, Failures: e.Failures, DeadReason: e.DeadReason, DeadAt: e.DeadAt}
}

func entries(envs []*Envelope) []QueueEntry {
	out := make([]QueueEntry, 0, len(envs))
	for _, e := range envs {
		out = append(out, Entry(e))
	}
	return out
}

// adminAPI is the admin HTTP side: what it shows and changes (spool,
// queue, breakers, metrics, readiness), not the rest of the Relay.
type adminAPI struct {
	address      string
	allowedHosts []string
	spool        *spool.Spool
	queue        *queue
	gates        func() []*policy.Gate // in config order, for the status page
	reg          *prometheus.Registry
	log          *slog.Logger
	now          func() time.Time
	version      string
	ready        func() bool
	// readyBytes is what /readyz checks the spool could commit now: the
	// largest message SMTP advertises, with the commit's overhead.
	readyBytes func() int64

	ln  net.Listener // nil without admin.address
	srv *http.Server
}

// listen binds admin.address, if there is one.
func (a *adminAPI) listen() error {
	if a.address == "" {
		return nil
	}
	ln, err := net.Listen("tcp", a.address)
	if err != nil {
		return fmt.Errorf("admin.address: %w", err)
	}
	a.ln = ln
	return nil
}

// serve runs the admin HTTP server on the bound listener; a failure other
// than Shutdown goes to errc.
func (a *adminAPI) serve(errc chan<- error) {
	if a.ln == nil {
		return
	}
	a.srv = &http.Server{Handler: a.handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := a.srv.Serve(a.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("admin: %w", err)
		}
	}()
}

// stop ends the admin server last, so probes and scrapes see the drain.
func (a *adminAPI) stop() {
	if a.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := a.srv.Shutdown(ctx); err != nil {
		// A request outlived the grace (a slow scrape, say): cut it off
		// rather than leave the server running past the relay.
		a.log.Warn("admin server did not stop in time; closing its connections", "err", err)
		_ = a.srv.Close() // its error can only be the listener's, closed already by Shutdown
	}
}

func (a *adminAPI) handler() http.Handler {
	return adminGuard(newAdminHosts(a.address, a.allowedHosts), a.mux())
}

func (a *adminAPI) mux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+adminapi.Healthz, func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n")) // a probe that hung up has nothing to be told
	})
	mux.HandleFunc("GET "+adminapi.Readyz, func(w http.ResponseWriter, _ *http.Request) {
		if !a.ready() {
			http.Error(w, "not ready: starting or shutting down", http.StatusServiceUnavailable)
			return
		}
		// Ready means a message of the largest size SMTP advertises can
		// be committed now, not merely that a file can be created.
		if err := a.spool.Writable(a.readyBytes()); err != nil {
			a.log.Error("spool cannot accept messages", "err", err)
			msg := "not ready: spool not writable"
			if errors.Is(err, spool.ErrFull) {
				msg = "not ready: spool file system full"
			}
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n")) // as for healthz
	})
	mux.Handle("GET "+adminapi.Metrics, promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	// The files are the truth; reading them avoids racing the workers.
	mux.HandleFunc("GET "+adminapi.Queue, func(w http.ResponseWriter, _ *http.Request) {
		envs, err := a.spool.List()
		writeJSON(w, entries(envs), err)
	})
	mux.HandleFunc("GET "+adminapi.Dead, func(w http.ResponseWriter, _ *http.Request) {
		envs, err := a.spool.Dead()
		writeJSON(w, entries(envs), err)
	})
	mux.HandleFunc("POST "+adminapi.RetryAll, loopbackOnly(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]int{"retried": a.retryAll()}, nil)
	}))
	mux.HandleFunc("POST "+adminapi.Retry("{id}"), loopbackOnly(func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, map[string]string{"retried": req.PathValue("id")}, a.retry(req.PathValue("id")))
	}))
	mux.HandleFunc("DELETE "+adminapi.Message("{id}"), loopbackOnly(func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, map[string]string{"dropped": req.PathValue("id")}, a.drop(req.PathValue("id")))
	}))
	mux.HandleFunc("GET /{$}", a.statusPage)
	return mux
}

// Security headers for every admin response. The status page needs only
// its inline <style>; nothing may run, load, submit or frame it.
const (
	adminCSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
	// changeHeader must be on every state change. A cross-site form or a
	// "simple" fetch cannot send a custom header, and a fetch that sets
	// one needs a CORS preflight that the admin API never grants.
	changeHeader = adminapi.ChangeHeader
)

// adminGuard applies the browser-facing rules to every admin request
// before any handler runs: security headers, the Host check (DNS
// rebinding), and for state changes the request header and Origin check
// (cross-site requests). Refusals are 403 with a JSON error.
func adminGuard(hosts adminHosts, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		h := w.Header()
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", adminCSP)
		if !hosts.allowed(req.Host) {
			writeJSON(w, nil, forbidden(fmt.Sprintf("Host %q is not a name of this admin listener; add it to admin.allowed_hosts", req.Host)))
			return
		}
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			if req.Header.Get(changeHeader) != "1" {
				writeJSON(w, nil, forbidden("state changes need the header "+changeHeader+": 1 (the relaycar CLI sends it)"))
				return
			}
			if o := req.Header.Get("Origin"); o != "" && !hosts.sameSite(o, req.Host) {
				writeJSON(w, nil, forbidden(fmt.Sprintf("cross-origin request refused (Origin %q)", o)))
				return
			}
		}
		next.ServeHTTP(w, req)
	})
}

// adminHosts decides which Host header values the admin listener answers,
// the defence against DNS rebinding: a rebinding page reaches this port
// under the attacker's DNS name, so only names the relay knows for itself
// are accepted — "localhost", the host of admin.address, and
// admin.allowed_hosts (a Service name, say), on any port. Any IP literal
// is accepted too: a page whose origin is an IP literal was served by
// whoever answers on that IP, so it cannot rebind, and kubelet probes and
// Prometheus scrapes send the pod IP or a Service's cluster IP, which is
// not even an address of this host. That also covers the bound address
// and 127.0.0.0/8 and [::1].
type adminHosts struct{ names map[string]bool }

func newAdminHosts(address string, allowed []string) adminHosts {
	h := adminHosts{names: map[string]bool{"localhost": true}}
	if host, _, err := net.SplitHostPort(address); err == nil && host != "" {
		h.names[normHost(host)] = true
	}
	for _, a := range allowed {
		host, _ := splitHost(a)
		h.names[normHost(host)] = true
	}
	return h
}

// allowed reports whether a request with this Host header may be served.
// An empty Host (HTTP/1.0 health checks, such as HAProxy's default) is
// allowed: browsers always send one, so it cannot come from a page.
func (h adminHosts) allowed(hostport string) bool {
	if hostport == "" {
		return true
	}
	host, _ := splitHost(hostport)
	host = normHost(host)
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return h.names[host]
}

// sameSite reports whether a state change with this Origin header comes
// from this listener itself: the Origin is the Host the request was sent
// to, or one of the listener's names. Unlike a Host, an Origin can be an
// attacker's page served from an IP literal, so IP literals count only
// when they are the request's own Host. "null" (sandboxed or opaque
// origins) is foreign.
func (h adminHosts) sameSite(origin, reqHost string) bool {
	u, err := url.Parse(origin)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return false
	}
	if strings.EqualFold(u.Host, reqHost) {
		return true
	}
	return h.names[normHost(u.Hostname())]
}

// splitHost splits "host:port", "[v6]:port", "[v6]", "host" and a bare
// IPv6 address into host and port.
func splitHost(hostport string) (host, port string) {
	if h, p, err := net.SplitHostPort(hostport); err == nil {
		return h, p
	}
	return strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), ""
}

// normHost makes names compare the way DNS does: case-insensitively, and
// "name." is "name".
func normHost(h string) string { return strings.TrimSuffix(strings.ToLower(h), ".") }

// loopbackOnly guards the endpoints that change the queue. The admin port
// is often bound to 0.0.0.0 so the kubelet can probe it and Prometheus can
// scrape it; dropping mail must still need a shell in the pod (kubectl exec
// or port-forward). Requests from this host arrive from loopback, or from
// one of its own addresses when admin.address names the pod IP.
func loopbackOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, req *http.Request) {
		host, _, err := net.SplitHostPort(req.RemoteAddr)
		if ip := net.ParseIP(host); err != nil || ip == nil || !isLocalIP(ip) {
			writeJSON(w, nil, errForbidden)
			return
		}
		h(w, req)
	}
}

func isLocalIP(ip net.IP) bool {
	if ip.IsLoopback() {
		return true
	}
	addrs, _ := net.InterfaceAddrs() // on error none match: the request is refused, which is safe
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
			return true
		}
	}
	return false
}

// forbidden is an admin refusal; writeJSON answers it with 403.
type forbidden string

func (f forbidden) Error() string { return string(f) }

const errForbidden = forbidden("queue changes are accepted only from this host (kubectl exec or port-forward)")

// Retry makes a queued message due now, or moves a dead letter back into
// the queue.
func (r *Relay) Retry(id string) error { return r.api.retry(id) }

// RetryAll makes every queued message due now.
func (r *Relay) RetryAll() int { return r.api.retryAll() }

// Drop deletes a message, queued or dead.
func (r *Relay) Drop(id string) error { return r.api.drop(id) }

func (a *adminAPI) retry(id string) error {
	if queued, err := a.queue.retry(id); queued {
		return err
	}
	env, err := a.spool.Resurrect(id, a.now())
	if err != nil {
		return err
	}
	a.log.Info("dead letter requeued", "msg_id", id)
	a.queue.add(env)
	return nil
}

func (a *adminAPI) retryAll() int { return a.queue.retryAll() }

func (a *adminAPI) drop(id string) error {
	a.queue.forget(id)
	if err := a.spool.Drop(id); err != nil {
		return err
	}
	a.log.Info("message dropped by operator", "msg_id", id)
	return nil
}

// commitOverhead is what a commit writes besides the body: the header,
// the envelope record and the file system's own metadata, with room.
const commitOverhead = 64 << 10

func writeJSON(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, fs.ErrNotExist):
			code = http.StatusNotFound
			err = errors.New("no such message")
		case errors.Is(err, errBusy):
			code = http.StatusConflict
		case errors.As(err, new(forbidden)):
			code = http.StatusForbidden
		}
		w.WriteHeader(code)
		// Cannot fail to encode; a write error means the client hung up.
		_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	// Encode before the header goes out, so a value that cannot be
	// encoded is a 500 and not a 200 with an empty body.
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		writeJSON(w, nil, fmt.Errorf("encoding the answer: %w", err))
		return
	}
	_, _ = w.Write(append(b, '\n')) // as json.Encoder wrote it; a write error means the client hung up
}

var statusTmpl = template.Must(template.New("status").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>relaycar</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}.open{color:#b00}</style></head>
<body><h1>relaycar {{.Version}}</h1>
<p>Ready: {{.Ready}} &middot; queued: {{.Queued}} &middot; dead letters: {{.Dead}}</p>
<h2>Upstreams</h2><table><tr><th>name</th><th>breaker</th></tr>
{{range .Upstreams}}<tr><td>{{.Name}}</td><td class="{{.State}}">{{.State}}</td></tr>{{end}}</table>
<p>{{range $i, $l := .Links}}{{if $i}} &middot; {{end}}<a href="{{$l}}">{{$l}}</a>{{end}}</p>
</body></html>`))

func (a *adminAPI) statusPage(w http.ResponseWriter, _ *http.Request) {
	type up struct{ Name, State string }
	var ups []up
	for _, g := range a.gates() {
		ups = append(ups, up{g.Name(), g.State().String()})
	}
	// Render first, so a template error is a 500 and not half a page.
	var page bytes.Buffer
	if err := statusTmpl.Execute(&page, map[string]any{"Version": a.version, "Ready": a.ready(), "Queued": a.queue.len(),
		"Dead": a.spool.CountDead(), "Upstreams": ups, "Links": []string{adminapi.Queue, adminapi.Dead, adminapi.Metrics}}); err != nil {
		a.log.Error("rendering the admin status page", "err", err)
		http.Error(w, "status page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write(page.Bytes()) // a write error means the client hung up
}
