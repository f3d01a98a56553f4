// Package yamlconf prepares a parsed YAML config for decoding: it expands
// environment references and checks the tree against the Go type it will
// decode into. Each problem is a FieldError with the YAML path, which
// yaml.v3's own errors give only as line numbers, and a bad value does
// not hide the problems after it. It knows nothing of relaycar.
package yamlconf

import (
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// FieldError is one problem with one value of a config file. Callers
// match on Path (errors.As) instead of parsing Error's text.
type FieldError struct {
	Path string // e.g. "upstreams[2].api_key"; "" is the whole document
	Msg  string
}

// Error is "Path: Msg", the line `relaycar check` prints.
func (e FieldError) Error() string { return e.Path + ": " + e.Msg }

var envRE = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// Expand replaces ${VAR} and ${VAR:-default} in every scalar under n,
// looking variables up with lookup (os.LookupEnv in production). Working
// on parsed scalars, not on the file text, means a value from the
// environment can never inject YAML structure. A variable that is unset,
// or set empty where a default is given, takes the default; one unset
// without a default is a FieldError and expands to "".
func Expand(n *yaml.Node, lookup func(string) (string, bool)) []error {
	var errs []error
	expand(n, "", lookup, &errs)
	return errs
}

func expand(n *yaml.Node, path string, lookup func(string) (string, bool), errs *[]error) {
	switch n.Kind {
	case yaml.ScalarNode:
		if !strings.Contains(n.Value, "${") {
			return
		}
		n.Value = envRE.ReplaceAllStringFunc(n.Value, func(m string) string {
			sub := envRE.FindStringSubmatch(m)
			if v, ok := lookup(sub[1]); ok && (v != "" || sub[2] == "") {
				return v
			}
			if sub[2] != "" {
				return sub[3]
			}
			*errs = append(*errs, FieldError{path, fmt.Sprintf("environment variable %s is not set (use ${%s:-} for an empty default)", sub[1], sub[1])})
			return ""
		})
		if n.Tag == "!!str" && n.Style == 0 {
			// Re-resolve the tag so `${PORT:-25}` decodes as a number.
			n.Tag = ""
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			expand(n.Content[i+1], key(path, n.Content[i].Value), lookup, errs)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			expand(c, index(path, i), lookup, errs)
		}
	case yaml.DocumentNode, yaml.AliasNode:
		for _, c := range n.Content {
			expand(c, path, lookup, errs)
		}
	}
}

func key(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

func index(path string, i int) string { return fmt.Sprintf("%s[%d]", path, i) }

var durationType = reflect.TypeOf(time.Duration(0))

// Check reports unknown keys (with the closest known key, if one is near)
// and values of the wrong kind for t, which is what n decodes into: a
// struct read through its `yaml` tags, and the slices, maps, scalars and
// time.Duration inside it. It edits n so that decoding then succeeds:
// unknown keys are dropped and bad values nulled, which leaves their
// fields at whatever the target held before (the defaults), so a later
// validation can still report every other problem in the same run.
func Check(n *yaml.Node, t reflect.Type) []error {
	var errs []error
	check(n, t, "", &errs)
	return errs
}

func check(n *yaml.Node, t reflect.Type, path string, errs *[]error) {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	bad := func(format string, args ...any) {
		*errs = append(*errs, FieldError{path, fmt.Sprintf(format, args...)})
		*n = yaml.Node{Kind: yaml.ScalarNode, Tag: "!!null"}
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return
	}
	if t == durationType {
		if n.Kind != yaml.ScalarNode {
			bad("expected a duration such as 30s")
		} else if _, err := time.ParseDuration(n.Value); err != nil {
			bad("%q is not a duration (use e.g. 30s, 15m, 48h)", n.Value)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			bad("expected a mapping")
			return
		}
		fields := map[string]reflect.Type{}
		var names []string
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "" || name == "-" {
				continue
			}
			fields[name] = f.Type
			names = append(names, name)
		}
		kept := n.Content[:0]
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i].Value
			ft, ok := fields[k]
			if !ok {
				msg := "unknown key"
				if s := suggest(k, names); s != "" {
					msg += fmt.Sprintf(" (did you mean %s?)", s)
				}
				*errs = append(*errs, FieldError{key(path, k), msg})
				continue
			}
			check(n.Content[i+1], ft, key(path, k), errs)
			kept = append(kept, n.Content[i], n.Content[i+1])
		}
		n.Content = kept
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			bad("expected a list")
			return
		}
		for i, c := range n.Content {
			check(c, t.Elem(), index(path, i), errs)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			bad("expected a mapping")
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			check(n.Content[i+1], t.Elem(), key(path, n.Content[i].Value), errs)
		}
	case reflect.Int, reflect.Int64, reflect.Int32, reflect.Uint32, reflect.Uint64:
		if n.Kind != yaml.ScalarNode {
			bad("expected an integer")
		} else if _, err := strconv.ParseInt(n.Value, 0, 64); err != nil {
			bad("%q is not an integer", n.Value)
		}
	case reflect.Float64:
		if n.Kind != yaml.ScalarNode {
			bad("expected a number")
		} else if _, err := strconv.ParseFloat(n.Value, 64); err != nil {
			bad("%q is not a number", n.Value)
		}
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode {
			bad("expected true or false")
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			bad("expected a string")
		}
	}
}

// suggest returns the known key closest to a misspelt one, if within an
// edit distance of 2: further off, a guess misleads more than it helps.
func suggest(k string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		if d := editDistance(k, n); d < bestD {
			best, bestD = n, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}
