package relay

import (
	"slices"
	"testing"
)

func TestDiffByName(t *testing.T) {
	type c struct{ name, v string }
	old := []c{{"a", "1"}, {"b", "1"}, {"c", "1"}}
	next := []c{{"b", "2"}, {"d", "1"}, {"a", "1"}}
	added, changed, removed := diffByName(old, next, func(x c) string { return x.name })
	if !slices.Equal(added, []string{"d"}) || !slices.Equal(changed, []string{"b"}) || !slices.Equal(removed, []string{"c"}) {
		t.Errorf("added %v, changed %v, removed %v; want [d] [b] [c]", added, changed, removed)
	}
}
