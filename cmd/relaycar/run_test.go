package main

import "testing"

func TestLocalAddr(t *testing.T) {
	for in, want := range map[string]string{
		":9025":          "127.0.0.1:9025",
		"0.0.0.0:2525":   "127.0.0.1:2525",
		"[::]:25":        "127.0.0.1:25",
		"127.0.0.1:9025": "127.0.0.1:9025",
		"10.1.2.3:9025":  "10.1.2.3:9025",
		"relay.local:25": "relay.local:25",
		"not an address": "not an address",
	} {
		if got := localAddr(in); got != want {
			t.Errorf("localAddr(%q) = %q, want %q", in, got, want)
		}
	}
}
