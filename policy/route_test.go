package policy

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/relaycar/relaycar/upstreams"
)

func gatesFor(names ...string) map[string]*Gate {
	m := map[string]*Gate{}
	for _, n := range names {
		u := upstreams.Func{N: n, F: func(context.Context, *upstreams.Message) (upstreams.Receipt, error) { return upstreams.Receipt{}, nil }}
		c := upstreams.Config{Name: n, Type: "file"}
		c.ApplyDefaults()
		m[n] = NewGate(u, c, GateHooks{})
	}
	return m
}

func names(gs []*Gate) []string {
	var out []string
	for _, g := range gs {
		out = append(out, g.Name())
	}
	return out
}

func TestRouter_SplitFirstMatchWins(t *testing.T) {
	t.Parallel()
	routes := []RouteConfig{
		{Name: "marketing", Match: &Match{SenderDomains: []string{"News.Example.com"}, Headers: map[string]string{"X-Relay-Route": "marketing"}}, Upstreams: []string{"sg"}},
		{Name: "eu", Match: &Match{RecipientDomains: []string{"example.de", "example.fr"}}, Upstreams: []string{"mg"}},
		{Name: "alerts", Match: &Match{Headers: map[string]string{"X-Priority-Class": "alert"}}, Upstreams: []string{"ses"}},
		{Name: "default", Upstreams: []string{"ses", "sg"}},
	}
	r, err := NewRouter(routes, gatesFor("sg", "mg", "ses"), nil)
	if err != nil {
		t.Fatal(err)
	}
	hdr := func(m map[string]string) Header {
		return func(k string) string { return m[k] }
	}
	for _, tc := range []struct {
		name  string
		from  string
		rcpts []string
		h     map[string]string
		want  string // route=rcpt,rcpt;route=...
	}{
		{"default", "a@example.com", []string{"x@example.net"}, nil, "default=x@example.net"},
		{"sender and header both needed", "a@news.example.com", []string{"x@example.net"}, nil, "default=x@example.net"},
		{"sender domain case-insensitive + header", "a@NEWS.example.com", []string{"x@example.net"}, map[string]string{"X-Relay-Route": "Marketing "}, "marketing=x@example.net"},
		{"split by recipient domain", "a@example.com", []string{"x@example.de", "y@example.net", "z@EXAMPLE.fr"}, nil, "eu=x@example.de,z@EXAMPLE.fr;default=y@example.net"},
		{"earlier route wins over later", "a@news.example.com", []string{"x@example.de"}, map[string]string{"X-Relay-Route": "marketing"}, "marketing=x@example.de"},
		{"header route", "a@example.com", []string{"x@example.net"}, map[string]string{"X-Priority-Class": "alert"}, "alerts=x@example.net"},
		{"null sender", "", []string{"x@example.net"}, nil, "default=x@example.net"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			groups, unrouted := r.Split(tc.from, tc.rcpts, hdr(tc.h))
			if len(unrouted) > 0 {
				t.Fatalf("unrouted: %v", unrouted)
			}
			var parts []string
			for _, g := range groups {
				parts = append(parts, g.Route+"="+strings.Join(g.Rcpts, ","))
			}
			if got := strings.Join(parts, ";"); got != tc.want {
				t.Errorf("Split = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestRouter_Unrouted(t *testing.T) {
	t.Parallel()
	r, _ := NewRouter([]RouteConfig{{Name: "eu", Match: &Match{RecipientDomains: []string{"example.de"}}, Upstreams: []string{"a"}}}, gatesFor("a"), nil)
	groups, unrouted := r.Split("s@x.com", []string{"a@example.de", "b@example.com"}, func(string) string { return "" })
	if len(groups) != 1 || !slices.Equal(unrouted, []string{"b@example.com"}) {
		t.Errorf("groups=%v unrouted=%v", groups, unrouted)
	}
	if r.Default() != "" {
		t.Errorf("Default() = %q, want none", r.Default())
	}
}

func TestRouter_Strategies(t *testing.T) {
	t.Parallel()
	g := gatesFor("a", "b", "c")
	var x float64 // the weighted pick's random number, set per case below
	r, err := NewRouter([]RouteConfig{
		{Name: "fo", Upstreams: []string{"a", "b", "c"}, Strategy: "failover"},
		{Name: "rr", Upstreams: []string{"a", "b", "c"}, Strategy: "round_robin"},
		{Name: "w", Upstreams: []string{"a", "b", "c"}, Strategy: "weighted", Weights: map[string]int{"b": 80, "c": 20}},
	}, g, func() float64 { return x })
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if got := names(r.Candidates("fo")); !slices.Equal(got, []string{"a", "b", "c"}) {
			t.Errorf("failover order = %v", got)
		}
	}
	var rr []string
	for range 4 {
		rr = append(rr, strings.Join(names(r.Candidates("rr")), ""))
	}
	if want := []string{"abc", "bca", "cab", "abc"}; !slices.Equal(rr, want) {
		t.Errorf("round_robin = %v, want %v", rr, want)
	}
	for _, tc := range []struct {
		x    float64
		want string
	}{{0, "bac"}, {0.79, "bac"}, {0.8, "cab"}, {0.999, "cab"}} {
		x = tc.x
		if got := strings.Join(names(r.Candidates("w")), ""); got != tc.want {
			t.Errorf("weighted(x=%v) = %s, want %s", tc.x, got, tc.want)
		}
	}
}

func TestRouteConfig_Validate(t *testing.T) {
	t.Parallel()
	known := map[string]bool{"a": true, "b": true}
	for _, tc := range []struct {
		r    RouteConfig
		want string
	}{
		{RouteConfig{Name: "x", Upstreams: []string{"a"}}, ""},
		{RouteConfig{Upstreams: []string{"a"}}, "routes[0].name: required"},
		{RouteConfig{Name: "x"}, "routes[0].upstreams: at least one upstream is required"},
		{RouteConfig{Name: "x", Upstreams: []string{"a", "sg"}}, `routes[0].upstreams[1]: unknown upstream "sg"`},
		{RouteConfig{Name: "x", Upstreams: []string{"a", "a"}}, `routes[0].upstreams[1]: upstream "a" listed twice`},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, Strategy: "random"}, `routes[0].strategy: "random": must be one of failover, round_robin, weighted`},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, Strategy: "weighted"}, "routes[0].weights: strategy weighted needs a positive weight for at least one upstream"},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, Strategy: "weighted", Weights: map[string]int{"b": 1, "a": 1}}, "routes[0].weights.b: not one of this route's upstreams"},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, Weights: map[string]int{"a": 1}}, "routes[0].weights: only used with strategy weighted"},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, Match: &Match{SenderDomains: []string{"user@example.com"}}}, `routes[0].match.sender_domains[0]: "user@example.com" is not a domain`},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, RedirectAllTo: []string{"qa@example.com", "qa2@example.com"}}, ""},
		{RouteConfig{Name: "x", Upstreams: []string{"a"}, RedirectAllTo: []string{"QA <qa@example.com>", "qa", "a@b.com\nBcc: c@d.com", "q@x.com", "Q@X.com"}}, strings.Join([]string{
			`routes[0].redirect_all_to[0]: "QA <qa@example.com>": use the bare address, without a display name or angle brackets`,
			`routes[0].redirect_all_to[1]: "qa": not an email address: mail: missing '@' or angle-addr`,
			`routes[0].redirect_all_to[2]: "a@b.com\nBcc: c@d.com": must not contain CR or LF`,
			`routes[0].redirect_all_to[4]: "Q@X.com" listed twice`,
		}, "\n")},
	} {
		var got []string
		for _, e := range tc.r.Validate("routes[0]", known) {
			got = append(got, e.Error())
		}
		if s := strings.Join(got, "\n"); s != tc.want {
			t.Errorf("Validate(%+v) =\n%s\nwant\n%s", tc.r, s, tc.want)
		}
	}
}

func TestRouter_RedirectAllTo(t *testing.T) {
	t.Parallel()
	r, err := NewRouter([]RouteConfig{
		{Name: "staging", Upstreams: []string{"a"}, RedirectAllTo: []string{"qa@example.com"}},
		{Name: "prod", Upstreams: []string{"a"}},
	}, gatesFor("a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.RedirectAllTo("staging"); !slices.Equal(got, []string{"qa@example.com"}) {
		t.Errorf("staging = %v", got)
	}
	if got := r.RedirectAllTo("prod"); got != nil {
		t.Errorf("prod = %v", got)
	}
	if got := r.RedirectAllTo("gone"); got != nil {
		t.Errorf("unknown route = %v", got)
	}
}

func TestRouter_MaxMessageBytes(t *testing.T) {
	t.Parallel()
	mk := func(name string, max int64) *Gate {
		c := upstreams.Config{Name: name, MaxMessageBytes: max}
		c.ApplyDefaults()
		return NewGate(upstreams.Func{N: name}, c, GateHooks{})
	}
	gates := map[string]*Gate{"small": mk("small", 1000), "big": mk("big", 5000), "any": mk("any", 0)}
	r, _ := NewRouter([]RouteConfig{
		{Name: "sized", Upstreams: []string{"small", "big"}},
		{Name: "open", Upstreams: []string{"small", "any"}},
	}, gates, nil)
	for route, want := range map[string]int64{"sized": 5000, "open": 0, "nope": 0} {
		if got := r.MaxMessageBytes(route); got != want {
			t.Errorf("MaxMessageBytes(%s) = %d, want %d", route, got, want)
		}
	}
}
