package upstreams

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
)

// httpOracle is the status-code oracle: every registered HTTP status
// (and a few unregistered ones at the edges of each bucket), written out by
// hand with the class it must get. It is a literal table on purpose: it does
// not share, copy or compute from the switch in classifyHTTP, so a change to
// that switch has to be made here too, in plain sight.
//
// classify is what classifyHTTP returns. api is what an HTTP adapter
// without richer error codes (Mailgun, SMTP2GO, SES with an unknown error
// code) must return for that answer; it differs from classify only for 2xx,
// which reach the classifier only when the adapter could not read them as
// "accepted, id X" and so are Ambiguous (the provider may have the message).
var httpOracle = []struct {
	status        int
	classify, api Class
}{
	// 1xx never end a request; nothing to act on.
	{100, Transient, Transient},
	{101, Transient, Transient},
	{102, Transient, Transient},
	{103, Transient, Transient},

	// 2xx the adapter could not read as an acceptance.
	{200, Transient, Ambiguous},
	{201, Transient, Ambiguous},
	{202, Transient, Ambiguous},
	{203, Transient, Ambiguous},
	{204, Transient, Ambiguous}, // no body to carry an id
	{205, Transient, Ambiguous},
	{206, Transient, Ambiguous},
	{207, Transient, Ambiguous},
	{208, Transient, Ambiguous},
	{226, Transient, Ambiguous},
	{299, Transient, Ambiguous}, // unregistered

	// 3xx without a usable Location: not an answer from the API.
	{300, Transient, Transient},
	{301, Transient, Transient},
	{302, Transient, Transient},
	{303, Transient, Transient},
	{304, Transient, Transient},
	{305, Transient, Transient},
	{306, Transient, Transient}, // unused
	{307, Transient, Transient},
	{308, Transient, Transient},
	{399, Transient, Transient}, // unregistered

	// 4xx: the message (400, 422), the account (401, 403), load (408,
	// 429), size (413); the rest are account or configuration problems.
	{400, Rejected, Rejected},
	{401, ProviderFault, ProviderFault},
	{402, ProviderFault, ProviderFault},
	{403, ProviderFault, ProviderFault},
	{404, ProviderFault, ProviderFault},
	{405, ProviderFault, ProviderFault},
	{406, ProviderFault, ProviderFault},
	{407, ProviderFault, ProviderFault},
	{408, Transient, Transient},
	{409, ProviderFault, ProviderFault},
	{410, ProviderFault, ProviderFault},
	{411, ProviderFault, ProviderFault},
	{412, ProviderFault, ProviderFault},
	{413, Unsupported, Unsupported}, // too big here; another upstream may take it
	{414, ProviderFault, ProviderFault},
	{415, ProviderFault, ProviderFault},
	{416, ProviderFault, ProviderFault},
	{417, ProviderFault, ProviderFault},
	{418, ProviderFault, ProviderFault},
	{419, ProviderFault, ProviderFault}, // unregistered
	{420, ProviderFault, ProviderFault}, // unregistered ("enhance your calm")
	{421, ProviderFault, ProviderFault},
	{422, Rejected, Rejected},
	{423, ProviderFault, ProviderFault},
	{424, ProviderFault, ProviderFault},
	{425, ProviderFault, ProviderFault},
	{426, ProviderFault, ProviderFault},
	{428, ProviderFault, ProviderFault},
	{429, Transient, Transient},
	{431, ProviderFault, ProviderFault},
	{451, ProviderFault, ProviderFault}, // data residency
	{499, ProviderFault, ProviderFault}, // unregistered (nginx: client closed)

	// 5xx: the provider's trouble; retry.
	{500, Transient, Transient},
	{501, Transient, Transient},
	{502, Transient, Transient},
	{503, Transient, Transient},
	{504, Transient, Transient},
	{505, Transient, Transient},
	{506, Transient, Transient},
	{507, Transient, Transient},
	{508, Transient, Transient},
	{509, Transient, Transient}, // unregistered
	{510, Transient, Transient},
	{511, Transient, Transient},
	{520, Transient, Transient}, // unregistered (Cloudflare)
	{599, Transient, Transient}, // unregistered
}

// httpOracleUnlisted is the class of a status that is not in httpOracle
// (unregistered codes the sweeps still send), by its first digit.
var httpOracleUnlisted = map[int]struct{ classify, api Class }{
	1: {Transient, Transient},
	2: {Transient, Ambiguous},
	3: {Transient, Transient},
	4: {ProviderFault, ProviderFault},
	5: {Transient, Transient},
}

// oracle returns the oracle's classes for status. A status outside
// 100-599 is a bug in the calling test.
func oracle(status int) (classify, api Class) {
	for _, o := range httpOracle {
		if o.status == status {
			return o.classify, o.api
		}
	}
	u, ok := httpOracleUnlisted[status/100]
	if !ok {
		panic(fmt.Sprintf("status %d is outside the oracle (100-599)", status))
	}
	return u.classify, u.api
}

func TestClassifyHTTP_Oracle(t *testing.T) {
	t.Parallel()
	for _, o := range httpOracle {
		if got := classifyHTTP(o.status); got != o.classify {
			t.Errorf("ClassifyHTTP(%d) = %v, want %v", o.status, got, o.classify)
		}
	}
	// Unlisted codes too, so a new special case in classifyHTTP cannot hide
	// in a gap of the table.
	for status := 100; status <= 599; status++ {
		want, _ := oracle(status)
		if got := classifyHTTP(status); got != want {
			t.Errorf("ClassifyHTTP(%d) = %v, want %v", status, got, want)
		}
	}
}

// Every status net/http knows by name is written out in the oracle, so
// none falls to the by-first-digit default.
func TestHTTPOracle_ListsEveryRegisteredStatus(t *testing.T) {
	t.Parallel()
	listed := map[int]bool{}
	for _, o := range httpOracle {
		if listed[o.status] {
			t.Errorf("status %d listed twice", o.status)
		}
		listed[o.status] = true
		if o.status < 100 || o.status > 599 {
			t.Errorf("status %d outside 100-599", o.status)
		}
	}
	for status := 100; status <= 599; status++ {
		if http.StatusText(status) != "" && !listed[status] {
			t.Errorf("registered status %d (%s) missing from httpOracle", status, http.StatusText(status))
		}
	}
}

func TestClassOfAndNames(t *testing.T) {
	if ClassOf(errors.New("unclassified")) != Transient {
		t.Error("unclassified errors must default to transient")
	}
	for _, c := range Classes {
		if c.String() == "unknown" {
			t.Errorf("class %d has no name", c)
		}
	}
	if Class(99).String() != "unknown" {
		t.Error("out-of-range class")
	}
}
