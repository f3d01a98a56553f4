package upstreams

import "io"

// bodyOf reads a message's whole body (tests only).
func bodyOf(m *Message) []byte {
	b, err := io.ReadAll(m.Reader())
	if err != nil {
		panic(err)
	}
	return b
}
