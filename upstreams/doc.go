// Package upstreams holds the Upstream interface, the error classes that
// steer failover, and one adapter per provider type.
//
// To add a provider, write one file with, in this order: the type; a
// constructor newX(c Config, d Deps) that validates what it needs and
// builds its client with Config.Endpoint overridable for tests (HTTP ones
// from Deps.httpClient, which bounds the time and size of every response,
// so an endless body cannot hold a worker or its memory); Send, which
// builds the request, calls the provider once (the relay owns retries, so
// SDK retries stay off) and classifies every failure into an *Error; its
// helpers; and an interface guard. Then add the type to New's switch, to
// Types and to Config.Validate, and give it the three tests every adapter
// has: a request-recording fake for the success path, a status sweep, and
// a secret-leak test.
//
// Classification rules of thumb: an unclassified error is Transient (a
// wrong "transient" costs a retry, a wrong "rejected" loses mail); an error
// after the whole request was sent and no answer came is Ambiguous; a
// message this provider cannot carry is Unsupported, so the route fails
// over without blaming the provider.
package upstreams
