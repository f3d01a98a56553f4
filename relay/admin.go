package relay

import (
	"encoding/json"
	"errors"
	"html/template"
	"io/fs"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// QueueEntry is one message in GET /api/queue and `relaycar queue ls`.
type QueueEntry struct {
	ID          string       `json:"id"`
	Sender      string       `json:"sender"`
	Recipients  []string     `json:"recipients"`
	Attempts    int          `json:"attempts"`
	NextAttempt time.Time    `json:"next_attempt"`
	LastError   string       `json:"last_error,omitempty"`
	ReceivedAt  time.Time    `json:"received_at"`
	Size        int          `json:"size"`
	MessageID   string       `json:"message_id"`
	Routes      []RouteState `json:"routes"`
	Deliveries  []Delivery   `json:"deliveries,omitempty"`
	Failures    []Failure    `json:"failures,omitempty"`
	DeadReason  string       `json:"dead_reason,omitempty"`
	DeadAt      *time.Time   `json:"dead_at,omitempty"`
}

// Entry is the API view of an envelope.
func Entry(e *Envelope) QueueEntry {
	return QueueEntry{ID: e.ID, Sender: e.From, Recipients: e.Rcpts, Attempts: e.Attempts, NextAttempt: e.NextAttempt,
		LastError: e.LastError, ReceivedAt: e.ReceivedAt, Size: e.Size, MessageID: e.MessageID, Routes: e.Routes,
		Deliveries: e.Deliveries, Failures: e.Failures, DeadReason: e.DeadReason, DeadAt: e.DeadAt}
}

func entries(envs []*Envelope) []QueueEntry {
	out := make([]QueueEntry, 0, len(envs))
	for _, e := range envs {
		out = append(out, Entry(e))
	}
	return out
}

func (r *Relay) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !r.ready.Load() {
			http.Error(w, "not ready: starting or shutting down", http.StatusServiceUnavailable)
			return
		}
		if err := r.spool.Writable(); err != nil {
			r.log.Error("spool not writable", "err", err)
			http.Error(w, "not ready: spool not writable", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{}))
	// The files are the truth; reading them avoids racing the workers.
	mux.HandleFunc("GET /api/queue", func(w http.ResponseWriter, _ *http.Request) {
		envs, err := r.spool.List()
		writeJSON(w, entries(envs), err)
	})
	mux.HandleFunc("GET /api/dead", func(w http.ResponseWriter, _ *http.Request) {
		envs, err := r.spool.Dead()
		writeJSON(w, entries(envs), err)
	})
	mux.HandleFunc("POST /api/queue/retry", loopbackOnly(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]int{"retried": r.RetryAll()}, nil)
	}))
	mux.HandleFunc("POST /api/queue/{id}/retry", loopbackOnly(func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, map[string]string{"retried": req.PathValue("id")}, r.Retry(req.PathValue("id")))
	}))
	mux.HandleFunc("DELETE /api/queue/{id}", loopbackOnly(func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, map[string]string{"dropped": req.PathValue("id")}, r.Drop(req.PathValue("id")))
	}))
	mux.HandleFunc("GET /{$}", r.statusPage)
	return mux
}

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
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
			return true
		}
	}
	return false
}

var errForbidden = errors.New("queue changes are accepted only from this host (kubectl exec or port-forward)")

// Retry makes a queued message due now, or moves a dead letter back into
// the queue.
func (r *Relay) Retry(id string) error {
	if queued, err := r.queue.retry(id); queued {
		return err
	}
	env, err := r.spool.Resurrect(id, r.now())
	if err != nil {
		return err
	}
	r.log.Info("dead letter requeued", "msg_id", id)
	r.queue.add(env, nil)
	return nil
}

// RetryAll makes every queued message due now.
func (r *Relay) RetryAll() int { return r.queue.retryAll() }

// Drop deletes a message, queued or dead.
func (r *Relay) Drop(id string) error {
	r.queue.forget(id)
	if err := r.spool.Drop(id); err != nil {
		return err
	}
	r.log.Info("message dropped by operator", "msg_id", id)
	return nil
}

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
		case errors.Is(err, errForbidden):
			code = http.StatusForbidden
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

var statusTmpl = template.Must(template.New("status").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>relaycar</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}.open{color:#b00}</style></head>
<body><h1>relaycar {{.Version}}</h1>
<p>Ready: {{.Ready}} &middot; queued: {{.Queued}} &middot; dead letters: {{.Dead}}</p>
<h2>Upstreams</h2><table><tr><th>name</th><th>breaker</th></tr>
{{range .Upstreams}}<tr><td>{{.Name}}</td><td class="{{.State}}">{{.State}}</td></tr>{{end}}</table>
<p><a href="/api/queue">/api/queue</a> &middot; <a href="/api/dead">/api/dead</a> &middot; <a href="/metrics">/metrics</a></p>
</body></html>`))

func (r *Relay) statusPage(w http.ResponseWriter, _ *http.Request) {
	type up struct{ Name, State string }
	var ups []up
	for _, u := range r.ups {
		ups = append(ups, up{u.Name(), r.gates[u.Name()].State().String()})
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	statusTmpl.Execute(w, map[string]any{"Version": r.version, "Ready": r.ready.Load(), "Queued": r.queue.len(),
		"Dead": r.spool.CountDead(), "Upstreams": ups})
}
