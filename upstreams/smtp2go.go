package upstreams

import "errors"

// PLACEHOLDER: replaced by the SMTP2GO adapter (issue 3).
func newSMTP2GO(c Config, d Deps) (Upstream, error) {
	return nil, errors.New("type smtp2go is not built yet")
}
