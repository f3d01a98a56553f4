package upstreams

import "errors"

// PLACEHOLDER: replaced by the Mailgun adapter (issue 3).
func newMailgun(c Config, d Deps) (Upstream, error) {
	return nil, errors.New("type mailgun is not built yet")
}
