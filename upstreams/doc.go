// Package upstreams holds the Upstream interface, the error classes that
// steer failover, and one adapter per provider type.
//
// Adding a provider is one file, one table entry and its tests. The file
// holds, in this order: the unexported type (callers get it from New as an
// Upstream); a constructor newX(c Config, d Deps) that trusts its config
// (New has applied the defaults and the kind's checks, and the relay has
// run Validate) and builds its client with Config.Endpoint overridable for
// tests (HTTP ones from Deps.httpClient, which bounds the time and size of
// every response, so an endless body cannot hold a worker or its memory);
// Send, which builds the request, calls the provider once (the relay owns
// retries, so SDK retries stay off) and classifies every failure into an
// *Error (a partial delivery is a Receipt with Refused, not an error); its
// helpers; and an interface guard. The entry goes in kinds (kinds.go) with
// a kindName constant: the constructor, the provider's size limit, the
// fields the kind requires and uses, its key forms, its defaults and its
// extra checks. typeNames, defaultMaxMessageBytes, ApplyDefaults, Validate
// and New all read that entry; nothing else names a type. The tests every
// adapter has: a request-recording fake for the success path, a status
// sweep, and a secret-leak test.
//
// Classification rules of thumb: an unclassified error is Transient (a
// wrong "transient" costs a retry, a wrong "rejected" loses mail); an error
// after the whole request was sent and no answer came is Ambiguous; a
// message this provider cannot carry is Unsupported, so the route fails
// over without blaming the provider.
package upstreams
