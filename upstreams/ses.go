package upstreams

import "errors"

// PLACEHOLDER: replaced by the SES adapter (issue 3).
func newSES(c Config, d Deps) (Upstream, error) {
	return nil, errors.New("type ses is not built yet")
}
