// Package relay is relaycar's engine: the SMTP listener, the durable spool,
// the delivery workers and the admin HTTP endpoints.
//
// The delivery contract:
//
//   - 250 is sent only after the message (<id>.eml) and its envelope
//     (<id>.json, the commit record) are written and the file system is
//     synced. Concurrent sessions share one syncfs(2) per batch (group
//     commit); each reply still waits for its own batch. A failed spool
//     write answers 451 4.3.0 and keeps nothing; a failed sync is sticky.
//   - Every accepted message ends delivered, or in dead/ with its reason.
//     Delivery is at-least-once: a crash between an upstream's acceptance
//     and the spool removal may send it again, with the same Message-ID.
//   - Recipients are split per route; each route walks its upstreams in
//     strategy order. The error class decides what happens next: rejected
//     stops the walk and dead-letters those recipients, ambiguous pins the
//     upstream (on_ambiguous: retry_same), everything else moves on to the
//     next upstream; when none is left the message waits for its next
//     attempt, persisted in its envelope first.
//   - Partial success is recorded per recipient and never resent.
//
// On disk, spool.dir holds <id>.eml and <id>.json per live message,
// dead/<id>.{eml,json} per dead letter, and <id>.{json,eml}.broken for
// entries Load could not trust (torn by a crash before their commit, or
// damaged). The files are the truth; the in-memory queue is rebuilt from
// them at start.
package relay
