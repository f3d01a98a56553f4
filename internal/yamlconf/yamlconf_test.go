package yamlconf

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

func parse(t *testing.T, src string) *yaml.Node {
	t.Helper()
	var root yaml.Node
	if err := yaml.Unmarshal([]byte(src), &root); err != nil {
		t.Fatal(err)
	}
	return root.Content[0]
}

func lines(errs []error) []string {
	var s []string
	for _, e := range errs {
		s = append(s, e.Error())
	}
	return s
}

func TestFieldError(t *testing.T) {
	t.Parallel()
	e := FieldError{Path: "upstreams[2].api_key", Msg: "required for type sendgrid"}
	if got := e.Error(); got != "upstreams[2].api_key: required for type sendgrid" {
		t.Errorf("Error() = %q", got)
	}
	var fe FieldError
	if !errors.As(errors.Join(errors.New("other"), fmt.Errorf("wrapped: %w", e)), &fe) || fe != e {
		t.Errorf("errors.As through Join and %%w: %+v", fe)
	}
}

func TestExpand(t *testing.T) {
	t.Parallel()
	env := map[string]string{"HOST": "mail.internal", "PORT": "2626", "EMPTY": "", "INJECT": "x\nroutes: []"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	type out struct {
		V any `yaml:"v"`
	}
	for _, tc := range []struct {
		in, want string // want is the value decoded, as %#v
		err      string
	}{
		{in: `v: ${HOST}`, want: `"mail.internal"`},
		{in: `v: smtp.${HOST}:25`, want: `"smtp.mail.internal:25"`},
		{in: `v: ${UNSET:-fallback}`, want: `"fallback"`},
		{in: `v: ${EMPTY:-fallback}`, want: `"fallback"`},
		// Unquoted, an empty result is null: the field keeps its default.
		{in: `v: ${EMPTY}`, want: `<nil>`},
		{in: `v: ${UNSET:-}`, want: `<nil>`},
		{in: `v: "${UNSET:-}"`, want: `""`},
		// An unquoted result is typed anew; a quoted one stays a string.
		{in: `v: ${PORT}`, want: `2626`},
		{in: `v: ${UNSET:-25}`, want: `25`},
		{in: `v: "${PORT}"`, want: `"2626"`},
		// A value never adds structure.
		{in: `v: ${INJECT}`, want: `"x\nroutes: []"`},
		{in: `v: ${UNSET}`, want: `<nil>`, err: "v: environment variable UNSET is not set (use ${UNSET:-} for an empty default)"},
		{in: `v: no reference`, want: `"no reference"`},
	} {
		n := parse(t, tc.in)
		errs := Expand(n, lookup)
		if got := strings.Join(lines(errs), "\n"); got != tc.err {
			t.Errorf("%s: errors %q, want %q", tc.in, got, tc.err)
		}
		var o out
		if err := n.Decode(&o); err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		if got := fmt.Sprintf("%#v", o.V); got != tc.want {
			t.Errorf("%s: decoded %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestExpand_Paths(t *testing.T) {
	t.Parallel()
	n := parse(t, `
a: ${X}
b:
  c: [ok, "${Y}", {d: "${Z}"}]
`)
	got := lines(Expand(n, func(string) (string, bool) { return "", false }))
	want := []string{
		"a: environment variable X is not set (use ${X:-} for an empty default)",
		"b.c[1]: environment variable Y is not set (use ${Y:-} for an empty default)",
		"b.c[2].d: environment variable Z is not set (use ${Z:-} for an empty default)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

type inner struct {
	Initial time.Duration `yaml:"initial"`
	Max     time.Duration `yaml:"max"`
}

type item struct {
	Name    string         `yaml:"name"`
	Weights map[string]int `yaml:"weights"`
	Tags    []string       `yaml:"tags"`
	Retry   *inner         `yaml:"retry"`
}

type root struct {
	Address  string        `yaml:"address"`
	Workers  int           `yaml:"workers"`
	Ratio    float64       `yaml:"ratio"`
	Verbose  bool          `yaml:"verbose"`
	Timeout  time.Duration `yaml:"timeout"`
	Items    []item        `yaml:"items"`
	Skipped  string        `yaml:"-"`
	Untagged string
}

func TestCheck(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in string
		want     []string
	}{
		{"valid", `
address: a:1
workers: 0x10
ratio: 1.5
verbose: true
timeout: 30s
items:
  - {name: x, weights: {a: 1}, tags: [t], retry: {initial: 1s, max: 2m}}
  - name: ~
`, nil},
		{"unknown keys, suggestion within distance 2", `
adress: a:1
workrs: 2
colour: blue
Untagged: x
Skipped: x
`, []string{
			"adress: unknown key (did you mean address?)",
			"workrs: unknown key (did you mean workers?)",
			"colour: unknown key",
			"Untagged: unknown key",
			"Skipped: unknown key",
		}},
		{"scalar kinds", `
workers: many
ratio: lots
verbose: [yes]
timeout: 10
address: {a: 1}
`, []string{
			`workers: "many" is not an integer`,
			`ratio: "lots" is not a number`,
			"verbose: expected true or false",
			`timeout: "10" is not a duration (use e.g. 30s, 15m, 48h)`,
			"address: expected a string",
		}},
		{"paths through lists, maps and pointers", `
items:
  - name: ok
  - weights: {a: 1, b: x}
    tags: [t, [nested]]
    retry: {initial: soon, maxx: 1s}
`, []string{
			`items[1].weights.b: "x" is not an integer`,
			"items[1].tags[1]: expected a string",
			`items[1].retry.initial: "soon" is not a duration (use e.g. 30s, 15m, 48h)`,
			"items[1].retry.maxx: unknown key (did you mean max?)",
		}},
		{"wrong shapes", `
items: {name: x}
timeout: {a: 1}
`, []string{"items: expected a list", "timeout: expected a duration such as 30s"}},
		{"nested shapes", `
items:
  - x
  - weights: [1]
    tags: t
`, []string{"items[0]: expected a mapping", "items[1].weights: expected a mapping", "items[1].tags: expected a list"}},
		{"aliases are checked where used", `
base: &b {initial: never}
items:
  - retry: *b
`, []string{"base: unknown key", `items[0].retry.initial: "never" is not a duration (use e.g. 30s, 15m, 48h)`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := lines(Check(parse(t, tc.in), reflect.TypeOf(root{})))
			if !slices.Equal(got, tc.want) {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// Check leaves a tree that decodes, with bad values and unknown keys gone
// and the fields they named at what the target held before.
func TestCheck_DecodesKeepingDefaults(t *testing.T) {
	t.Parallel()
	n := parse(t, `
address: b:2
workers: many
timeout: forever
extra: 1
items: [{name: x, tags: t}]
`)
	if errs := Check(n, reflect.TypeOf(root{})); len(errs) != 4 {
		t.Fatalf("%d errors, want 4: %v", len(errs), errs)
	}
	got := root{Address: "a:1", Workers: 16, Timeout: time.Minute}
	if err := n.Decode(&got); err != nil {
		t.Fatal(err)
	}
	want := root{Address: "b:2", Workers: 16, Timeout: time.Minute, Items: []item{{Name: "x"}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("decoded %+v, want %+v", got, want)
	}
}

func TestCheck_RootNotAMapping(t *testing.T) {
	t.Parallel()
	errs := Check(parse(t, `[1, 2]`), reflect.TypeOf(&root{}))
	var fe FieldError
	if len(errs) != 1 || !errors.As(errs[0], &fe) || fe != (FieldError{Path: "", Msg: "expected a mapping"}) {
		t.Errorf("got %#v", errs)
	}
}

func TestSuggest(t *testing.T) {
	t.Parallel()
	names := []string{"address", "hostname", "max_recipients", "workers"}
	for key, want := range map[string]string{
		"adress":        "address",
		"max_recipient": "max_recipients",
		"hostnmae":      "hostname", // a swap is two edits
		"maximum":       "",
		"":              "",
	} {
		if got := suggest(key, names); got != want {
			t.Errorf("suggest(%q) = %q, want %q", key, got, want)
		}
	}
}
