package upstreams

import "errors"

// PLACEHOLDER: replaced by the SendGrid adapter (issue 3).
func newSendGrid(c Config, d Deps) (Upstream, error) {
	return nil, errors.New("type sendgrid is not built yet")
}
