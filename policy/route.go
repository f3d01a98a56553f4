package policy

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/relaycar/relaycar/internal/yamlconf"
	"github.com/relaycar/relaycar/upstreams"
)

// RouteConfig is one entry of relay.yaml `routes:`.
type RouteConfig struct {
	Name      string         `yaml:"name"`
	Match     *Match         `yaml:"match"`
	Upstreams []string       `yaml:"upstreams"`
	Strategy  Strategy       `yaml:"strategy"`
	Weights   map[string]int `yaml:"weights"`
	// RedirectAllTo replaces every recipient of the route (staging): the
	// originals go into X-Original-To, To becomes this list, Cc and Bcc go.
	RedirectAllTo []string `yaml:"redirect_all_to"`
}

// Match selects recipients. All given criteria must hold; within a list any
// entry may match. A route without Match matches everything.
type Match struct {
	SenderDomains    []string          `yaml:"sender_domains"`
	RecipientDomains []string          `yaml:"recipient_domains"`
	Headers          map[string]string `yaml:"headers"`
}

// Strategy orders a route's upstreams for each message.
type Strategy string

const (
	Failover   Strategy = "failover"    // in listed order
	RoundRobin Strategy = "round_robin" // rotate the first upstream
	Weighted   Strategy = "weighted"    // first by weight, then in listed order
)

// Strategies lists the accepted values of `strategy`, for messages.
func Strategies() []string { return []string{string(Failover), string(RoundRobin), string(Weighted)} }

// Validate returns every problem as a yamlconf.FieldError at
// "routes[i].key". known are the upstream names defined in the config.
func (r *RouteConfig) Validate(path string, known map[string]bool) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, yamlconf.FieldError{Path: path + "." + key, Msg: fmt.Sprintf(format, args...)})
	}
	if r.Name == "" {
		bad("name", "required")
	}
	if len(r.Upstreams) == 0 {
		bad("upstreams", "at least one upstream is required")
	}
	seen := map[string]bool{}
	for i, u := range r.Upstreams {
		switch {
		case !known[u]:
			bad(fmt.Sprintf("upstreams[%d]", i), "unknown upstream %q", u)
		case seen[u]:
			bad(fmt.Sprintf("upstreams[%d]", i), "upstream %q listed twice", u)
		}
		seen[u] = true
	}
	switch r.Strategy {
	case "", Failover, RoundRobin:
		if len(r.Weights) > 0 {
			bad("weights", "only used with strategy weighted")
		}
	case Weighted:
		total := 0
		for name, w := range r.Weights {
			if !seen[name] {
				bad("weights."+name, "not one of this route's upstreams")
			}
			if w < 0 {
				bad("weights."+name, "must not be negative")
			}
			total += w
		}
		if total == 0 {
			bad("weights", "strategy weighted needs a positive weight for at least one upstream")
		}
	default:
		bad("strategy", "%q: must be one of %s", r.Strategy, strings.Join(Strategies(), ", "))
	}
	redirect := map[string]bool{}
	for i, a := range r.RedirectAllTo {
		key := fmt.Sprintf("redirect_all_to[%d]", i)
		if msg := upstreams.PlainAddressProblem(a); msg != "" {
			bad(key, "%q: %s", a, msg)
		} else if redirect[strings.ToLower(a)] {
			bad(key, "%q listed twice", a)
		}
		redirect[strings.ToLower(a)] = true
	}
	if m := r.Match; m != nil {
		for i, d := range m.SenderDomains {
			if d == "" || strings.ContainsAny(d, "@ ") {
				bad(fmt.Sprintf("match.sender_domains[%d]", i), "%q is not a domain", d)
			}
		}
		for i, d := range m.RecipientDomains {
			if d == "" || strings.ContainsAny(d, "@ ") {
				bad(fmt.Sprintf("match.recipient_domains[%d]", i), "%q is not a domain", d)
			}
		}
		for k := range m.Headers {
			if k == "" || strings.ContainsAny(k, ": ") {
				bad("match.headers", "%q is not a header name", k)
			}
		}
	}
	return errs
}

// Header looks up a header value of the message being routed.
type Header func(name string) string

// Group is the recipients of one message that share a route.
type Group struct {
	Route string
	Rcpts []string
}

type route struct {
	cfg     RouteConfig
	gates   []*Gate
	senders map[string]bool
	rcpts   map[string]bool
	rr      atomic.Uint64
}

// Router holds the routes in config order; the first match wins.
type Router struct {
	routes []*route
	byName map[string]*route
	// rand returns a float in [0,1) for weighted picks.
	rand func() float64
}

// NewRouter builds routes over the given gates (by upstream name). rnd is
// the randomness of weighted picks (nil: math/rand), a seam for tests.
func NewRouter(cfgs []RouteConfig, gates map[string]*Gate, rnd func() float64) (*Router, error) {
	if rnd == nil {
		rnd = rand.Float64
	}
	r := &Router{byName: map[string]*route{}, rand: rnd}
	for _, c := range cfgs {
		rt := &route{cfg: c, senders: set(nil), rcpts: set(nil)}
		if c.Match != nil {
			rt.senders, rt.rcpts = set(c.Match.SenderDomains), set(c.Match.RecipientDomains)
		}
		for _, n := range c.Upstreams {
			g, ok := gates[n]
			if !ok {
				return nil, fmt.Errorf("route %q: unknown upstream %q", c.Name, n)
			}
			rt.gates = append(rt.gates, g)
		}
		r.routes = append(r.routes, rt)
		r.byName[c.Name] = rt
	}
	return r, nil
}

func set(list []string) map[string]bool {
	m := map[string]bool{}
	for _, s := range list {
		m[strings.ToLower(s)] = true
	}
	return m
}

// Split assigns each recipient to the first route that matches it. Recipients
// no route matches are returned separately.
func (r *Router) Split(from string, rcpts []string, h Header) (groups []Group, unrouted []string) {
	idx := map[string]int{}
	for _, rc := range rcpts {
		rt := r.match(from, rc, h)
		if rt == nil {
			unrouted = append(unrouted, rc)
			continue
		}
		i, ok := idx[rt.cfg.Name]
		if !ok {
			i = len(groups)
			idx[rt.cfg.Name] = i
			groups = append(groups, Group{Route: rt.cfg.Name})
		}
		groups[i].Rcpts = append(groups[i].Rcpts, rc)
	}
	return groups, unrouted
}

func (r *Router) match(from, rcpt string, h Header) *route {
	for _, rt := range r.routes {
		m := rt.cfg.Match
		if m == nil {
			return rt
		}
		if len(rt.senders) > 0 && !rt.senders[upstreams.Domain(from)] {
			continue
		}
		if len(rt.rcpts) > 0 && !rt.rcpts[upstreams.Domain(rcpt)] {
			continue
		}
		ok := true
		for k, v := range m.Headers {
			if !strings.EqualFold(strings.TrimSpace(h(k)), v) {
				ok = false
				break
			}
		}
		if ok {
			return rt
		}
	}
	return nil
}

// Has reports whether a route of that name exists.
func (r *Router) Has(name string) bool { return r.byName[name] != nil }

// RedirectAllTo returns the route's redirect_all_to list, nil if it
// delivers to the real recipients.
func (r *Router) RedirectAllTo(name string) []string {
	if rt := r.byName[name]; rt != nil {
		return rt.cfg.RedirectAllTo
	}
	return nil
}

// Default returns the name of the first route without a match, or "".
func (r *Router) Default() string {
	for _, rt := range r.routes {
		if rt.cfg.Match == nil {
			return rt.cfg.Name
		}
	}
	return ""
}

// MaxMessageBytes is the largest message any upstream of the route accepts;
// 0 means no upstream of the route sets a limit.
func (r *Router) MaxMessageBytes(name string) int64 {
	rt := r.byName[name]
	if rt == nil {
		return 0
	}
	var m int64
	for _, g := range rt.gates {
		if g.maxBytes == 0 {
			return 0
		}
		m = max(m, g.maxBytes)
	}
	return m
}

// LargestMessageBytes is the largest message some route can deliver: 0
// when a route has an upstream without a limit. EHLO SIZE advertises it.
func (r *Router) LargestMessageBytes() int64 {
	var largest int64
	for name := range r.byName {
		m := r.MaxMessageBytes(name)
		if m == 0 {
			return 0
		}
		largest = max(largest, m)
	}
	return largest
}

// Candidates returns the route's upstreams in the order to try them.
func (r *Router) Candidates(name string) []*Gate {
	rt := r.byName[name]
	if rt == nil {
		return nil
	}
	gates := slices.Clone(rt.gates)
	switch rt.cfg.Strategy {
	case RoundRobin:
		n := uint64(len(gates))
		start := int((rt.rr.Add(1) - 1) % n)
		gates = append(gates[start:], gates[:start]...)
	case Weighted:
		first := pickWeighted(gates, rt.cfg.Weights, r.rand())
		if first > 0 {
			g := gates[first]
			gates = append(append([]*Gate{g}, gates[:first]...), gates[first+1:]...)
		}
	}
	return gates
}

// pickWeighted returns the index chosen by weight for x in [0,1). The others
// stay in config order behind it, as failover.
func pickWeighted(gates []*Gate, weights map[string]int, x float64) int {
	total := 0
	for _, g := range gates {
		total += weights[g.Name()]
	}
	if total <= 0 {
		return 0
	}
	target := x * float64(total)
	acc := 0.0
	for i, g := range gates {
		acc += float64(weights[g.Name()])
		if target < acc {
			return i
		}
	}
	return len(gates) - 1
}
