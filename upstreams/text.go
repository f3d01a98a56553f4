package upstreams

import "strings"

// Text helpers shared by the SMTP and HTTP API adapters.

// needsUTF8 reports whether the envelope of m needs SMTPUTF8.
func needsUTF8(m *Message) bool {
	if !IsASCII(m.From) {
		return true
	}
	for _, r := range m.To {
		if !IsASCII(r) {
			return true
		}
	}
	return false
}

// IsASCII reports whether s needs no SMTPUTF8.
func IsASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// oneLine collapses every run of white space, newlines included, into one
// space, for reasons that must fit on one log line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
