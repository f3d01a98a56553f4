package relay

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/relaycar/relaycar/policy"
	"github.com/relaycar/relaycar/relay/spool"
	"github.com/relaycar/relaycar/upstreams"
)

// worker delivers items from in until it is closed.
func (r *Relay) worker(ctx context.Context, in <-chan *item) {
	for it := range in {
		keep := r.attempt(ctx, it.env)
		r.queue.done(it, keep)
	}
}

// attempt makes one delivery attempt for every route of env that still has
// recipients, then persists the outcome. It returns whether the message
// stays in the spool.
func (r *Relay) attempt(ctx context.Context, env *Envelope) (keep bool) {
	// One engine for the whole attempt: a reload swaps between attempts.
	e := r.acquire()
	defer e.release()
	log := r.log.With("msg_id", env.ID)
	body, err := r.spool.OpenBody(env.ID)
	if errors.Is(err, fs.ErrNotExist) {
		// Dropped by an operator meanwhile: nothing to send.
		log.Warn("message body gone (dropped); forgetting message", "err", err)
		return false
	}
	if err != nil {
		// An I/O error is no reason to give up on the message yet, but
		// max_age still holds: a body that never reads again ends as a
		// dead letter with the reason, not in an endless retry.
		now := r.now()
		if now.Sub(env.ReceivedAt) >= e.cfg.Spool.MaxAge {
			reason := fmt.Sprintf("max age %s exceeded; the spooled message cannot be read: %v", e.cfg.Spool.MaxAge, err)
			for i := range env.Routes {
				if len(env.Routes[i].Pending) > 0 {
					r.fail(env, &env.Routes[i], "", spool.FailedExpired, reason, now)
				}
			}
			return r.finish(e, env, log)
		}
		log.Error("reading message body failed; will retry", "err", err)
		env.NextAttempt = now.Add(policy.Backoff(1, e.cfg.Spool.Retry, r.rand))
		return true
	}
	defer body.Close()
	now := r.now()
	var (
		tried   bool
		lastErr error
	)
	for i := range env.Routes {
		rs := &env.Routes[i]
		if len(rs.Pending) == 0 {
			continue
		}
		if !e.router.Has(rs.Route) {
			// The route was renamed or removed since the message was accepted.
			def := e.router.Default()
			if def == "" {
				r.fail(env, rs, "", spool.FailedRejected, fmt.Sprintf("route %q no longer exists and there is no default route", rs.Route), now)
				continue
			}
			log.Warn("route no longer exists; using the default route", "route", rs.Route, "default", def)
			rs.Route, rs.Pinned = def, ""
		}
		t, err := r.deliverRoute(ctx, e, env, rs, body)
		tried = tried || t
		if err != nil {
			lastErr = err
		}
	}
	if ctx.Err() != nil && env.Pending() {
		// Shutting down mid-attempt: keep what was delivered, retry the
		// rest first thing after the restart.
		env.NextAttempt = now
		return r.persist(env, log)
	}
	if !env.Pending() {
		return r.finish(e, env, log)
	}
	if tried {
		env.Attempts++
	}
	if lastErr != nil {
		msg := lastErr.Error()
		if msg != env.LastError {
			log.Warn("delivery attempt failed", "err", lastErr, "attempt", env.Attempts)
		}
		env.LastError = msg
	}
	if age := now.Sub(env.ReceivedAt); age >= e.cfg.Spool.MaxAge {
		reason := fmt.Sprintf("max age %s exceeded after %d attempts", e.cfg.Spool.MaxAge, env.Attempts)
		if env.LastError != "" {
			reason += "; last error: " + env.LastError
		}
		if ue := upstreamErrorsText(env); ue != "" && ue != env.LastError {
			reason += "; last upstream errors: " + ue
		}
		for i := range env.Routes {
			if len(env.Routes[i].Pending) > 0 {
				r.fail(env, &env.Routes[i], "", spool.FailedExpired, reason, now)
			}
		}
		return r.finish(e, env, log)
	}
	var wait time.Duration
	if tried {
		wait = policy.Backoff(env.Attempts, e.cfg.Spool.Retry, r.rand)
	} else {
		// Every upstream was skipped (breaker open, rate limit): nothing
		// failed, so come back soon without growing the backoff.
		wait = policy.Backoff(1, e.cfg.Spool.Retry, r.rand)
	}
	env.NextAttempt = now.Add(wait)
	log.Debug("delivery deferred", "next_attempt", env.NextAttempt, "attempts", env.Attempts)
	return r.persist(env, log)
}

// persist writes env; false means the message vanished (an operator
// dropped it). Any other failure (a full disk) keeps the message queued in
// memory: its files are still on disk, only this attempt's bookkeeping is
// not, which at worst repeats an attempt after a restart.
func (r *Relay) persist(env *Envelope, log *slog.Logger) bool {
	err := r.spool.Update(env)
	switch {
	case err == nil:
		return true
	case errors.Is(err, fs.ErrNotExist):
		log.Warn("message no longer in the spool; forgetting it", "err", err)
		return false
	}
	log.Warn("updating spool entry failed; keeping the message queued", "err", err)
	return true
}

// finish removes a fully handled message, or dead-letters it if any
// recipient failed. It returns whether the message must stay queued: when
// the spool cannot record the outcome, the message is retried later
// rather than forgotten while its files remain.
func (r *Relay) finish(e *engine, env *Envelope, log *slog.Logger) (keep bool) {
	retryLater := func() bool {
		env.DeadReason, env.DeadAt = "", nil
		env.NextAttempt = r.now().Add(policy.Backoff(1, e.cfg.Spool.Retry, r.rand))
		return true
	}
	if len(env.Failures) == 0 {
		if err := r.spool.Remove(env.ID); err != nil {
			// Delivered; a leftover would only be sent again.
			log.Error("removing delivered message failed", "err", err)
		}
		return false
	}
	reason := deadReason(env)
	if err := r.spool.Bury(env, reason, r.now()); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false // dropped by an operator meanwhile
		}
		log.Error("dead-lettering failed; will try again", "err", err)
		return retryLater()
	}
	r.metrics.deadTotal.Inc()
	log.Info("message dead-lettered", "reason", reason, "age", r.now().Sub(env.ReceivedAt).Round(time.Second).String())
	return false
}

// deadReason is a dead letter's reason: each failure's recipients and why.
func deadReason(env *Envelope) string {
	reasons := make([]string, 0, len(env.Failures))
	for _, f := range env.Failures {
		reasons = append(reasons, fmt.Sprintf("%s: %s", strings.Join(f.Rcpts, ","), f.Reason))
	}
	return strings.Join(reasons, "; ")
}

func (r *Relay) fail(env *Envelope, rs *RouteState, upstream string, class spool.FailureClass, reason string, now time.Time) {
	env.Failures = append(env.Failures, Failure{Route: rs.Route, Upstream: upstream, Class: class, Rcpts: rs.Pending, Reason: reason, At: now.UTC()})
	rs.Pending, rs.Pinned = nil, ""
}

// deliverRoute walks the route's upstreams for the pending recipients, in
// strategy order: Rejected stops the walk and fails them; Ambiguous stops
// it and pins the upstream (on_ambiguous: retry_same); everything else
// moves on to the next upstream. tried says whether any upstream was
// actually called.
func (r *Relay) deliverRoute(ctx context.Context, e *engine, env *Envelope, rs *RouteState, body upstreams.Body) (tried bool, lastErr error) {
	cands := e.router.Candidates(rs.Route)
	if rs.Pinned != "" {
		i := slices.IndexFunc(cands, func(g *policy.Gate) bool { return g.Name() == rs.Pinned })
		if i >= 0 {
			cands = cands[i : i+1]
		} else {
			rs.Pinned = ""
		}
	}
	m := &upstreams.Message{ID: env.ID, From: env.From, To: slices.Clone(rs.Pending), AllRcpts: env.Rcpts, Body: body, MessageID: env.MessageID}
	log := r.log.With("msg_id", env.ID, "route", rs.Route)
	redirect := e.router.RedirectAllTo(rs.Route)
	if len(redirect) > 0 {
		rm, err := upstreams.Redirect(m, redirect)
		if err != nil {
			return false, err
		}
		m = rm
	}
	cannot := 0 // upstreams that can never carry this message
	var skips []string
	for _, g := range cands {
		if ctx.Err() != nil {
			return tried, lastErr
		}
		name := g.Name()
		if skip := g.Admit(ctx, policy.Ask{Size: m.Body.Size(), SenderDomain: m.SenderDomain(), Rcpts: len(m.To)}); skip != policy.NotSkipped {
			r.metrics.skipped.WithLabelValues(name, skip.String()).Inc()
			if skip == policy.SkipRateLimited {
				r.metrics.rateLimited.WithLabelValues(name).Inc()
			}
			if skip == policy.SkipTooBig {
				cannot++
			}
			skips = append(skips, name+" "+skip.String())
			continue
		}
		start := r.now()
		rc, err := g.Send(ctx, m)
		if errors.Is(err, policy.ErrBreakerOpen) {
			r.metrics.skipped.WithLabelValues(name, policy.SkipBreakerOpen.String()).Inc()
			skips = append(skips, name+" "+policy.SkipBreakerOpen.String())
			continue
		}
		if err != nil && ctx.Err() != nil {
			// Our own shutdown, not the upstream's fault: not an attempt. But
			// if the whole message had gone out, the upstream may have it.
			if upstreams.ClassOf(err) == upstreams.Ambiguous && e.cfg.Spool.OnAmbiguous == RetrySame {
				rs.Pinned = name
			}
			return tried, lastErr
		}
		tried = true
		elapsed := r.now().Sub(start)
		r.metrics.duration.WithLabelValues(name).Observe(elapsed.Seconds())
		if err == nil && len(redirect) > 0 {
			// Staging mail is all or nothing: a redirect address refused
			// fails the attempt for every original recipient.
			if err = redirectRefusal(rc, name); err == nil {
				r.metrics.deliveries.WithLabelValues(name, "delivered").Inc()
				r.delivered(env, rs, name, rc.ProviderID, rs.Pending, len(m.To), elapsed, log)
				rs.Pending, rs.Pinned = nil, ""
				return tried, nil
			}
		}
		if err == nil {
			// A partial delivery goes on, for the refused recipients, as a
			// failed attempt.
			if err = r.recordPartial(env, rs, m, name, rc, elapsed, log); err == nil {
				r.metrics.deliveries.WithLabelValues(name, "delivered").Inc()
				r.delivered(env, rs, name, rc.ProviderID, m.To, len(m.To), elapsed, log)
				rs.Pending, rs.Pinned = nil, ""
				return tried, nil
			}
		}
		class := upstreams.ClassOf(err)
		r.metrics.deliveries.WithLabelValues(name, class.String()).Inc()
		lastErr = err
		noteUpstreamError(env, name, err)
		log.Debug("upstream attempt failed", "upstream", name, "err", err)
		switch class {
		case upstreams.Rejected:
			if len(rs.Pending) > 0 { // recordPartial failed its own
				log.Warn("message rejected by upstream; not failing over", "err", err)
				r.fail(env, rs, name, spool.FailureClass(class.String()), err.Error(), r.now())
			}
			return tried, err
		case upstreams.Ambiguous:
			if e.cfg.Spool.OnAmbiguous == RetrySame {
				log.Warn("outcome unknown; will retry the same upstream only", "upstream", name, "err", err)
				rs.Pinned = name
				return tried, err
			}
			log.Warn("outcome unknown; failing over (the message may be delivered twice)", "upstream", name, "err", err)
			rs.Pinned = ""
		case upstreams.Unsupported:
			cannot++
		}
	}
	if cannot == len(cands) && len(cands) > 0 {
		reason := "no upstream of the route can carry this message"
		if lastErr != nil {
			reason += ": " + lastErr.Error()
		}
		r.fail(env, rs, "", spool.FailedRejected, reason, r.now())
		return tried, lastErr
	}
	if lastErr == nil && len(skips) > 0 {
		lastErr = fmt.Errorf("all upstreams skipped: %s", strings.Join(skips, ", "))
	}
	return tried, lastErr
}

// recordPartial settles the refusals of rc, a receipt for m: it records
// the recipients rc does not refuse as delivered, fails the Rejected ones
// and leaves the others as m.To and rs.Pending, to go on as after a failed
// attempt. It returns the refusal that decides how (a Rejected one when
// none is left), nil if rc refuses nobody.
func (r *Relay) recordPartial(env *Envelope, rs *RouteState, m *upstreams.Message, name string, rc upstreams.Receipt, took time.Duration, log *slog.Logger) error {
	if len(rc.Refused) == 0 {
		return nil
	}
	refused := map[string]*upstreams.Error{}
	for _, f := range rc.Refused {
		if !slices.Contains(m.To, f.Rcpt) {
			continue // not ours to retry
		}
		e := f.Err
		if e == nil {
			e = &upstreams.Error{Upstream: name, Class: upstreams.Transient, Reason: "recipient refused without a reason"}
		}
		refused[f.Rcpt] = e
	}
	if len(refused) == 0 {
		return nil
	}
	var done []string
	var rest, rejected upstreams.Receipt
	for _, a := range m.To {
		switch e := refused[a]; {
		case e == nil:
			done = append(done, a)
		case e.Class == upstreams.Rejected:
			rejected.Refused = append(rejected.Refused, upstreams.Refusal{Rcpt: a, Err: e})
		default:
			rest.Refused = append(rest.Refused, upstreams.Refusal{Rcpt: a, Err: e})
		}
	}
	if len(done) > 0 {
		r.delivered(env, rs, name, rc.ProviderID, done, len(done), took, log)
	}
	// One Failure per reason, in recipient order.
	now := r.now().UTC()
	byReason := map[string]int{}
	for _, f := range rejected.Refused {
		reason := f.Err.Error()
		i, ok := byReason[reason]
		if !ok {
			log.Warn("recipients rejected by upstream; not failing over", "upstream", name, "err", f.Err)
			i = len(env.Failures)
			byReason[reason] = i
			env.Failures = append(env.Failures, Failure{Route: rs.Route, Upstream: name, Class: spool.FailedRejected, Reason: reason, At: now})
		}
		env.Failures[i].Rcpts = append(env.Failures[i].Rcpts, f.Rcpt)
	}
	m.To, rs.Pending = rest.RefusedRcpts(), rest.RefusedRcpts()
	w := rest.Worst()
	if len(rest.Refused) == 0 {
		rs.Pending, rs.Pinned = nil, ""
		w = rejected.Worst()
	}
	if w == nil {
		return nil // a nil *Error must not become a non-nil error
	}
	return w
}

// redirectRefusal is the worst refusal of a redirected delivery's
// receipt, nil if the upstream took every redirect address.
func redirectRefusal(rc upstreams.Receipt, upstream string) error {
	if len(rc.Refused) == 0 {
		return nil
	}
	if w := rc.Worst(); w != nil {
		return w
	}
	return &upstreams.Error{Upstream: upstream, Class: upstreams.Transient, Reason: "redirect recipient refused without a reason"}
}

// delivered records rcpts as delivered through upstream. sent is how many
// addresses the provider sent to, what its quota counts: the redirect
// addresses, not rcpts, for a redirect_all_to route.
func (r *Relay) delivered(env *Envelope, rs *RouteState, upstream, id string, rcpts []string, sent int, took time.Duration, log *slog.Logger) {
	env.Deliveries = append(env.Deliveries, Delivery{Route: rs.Route, Upstream: upstream, ProviderID: id, Rcpts: rcpts, At: r.now().UTC()})
	r.quotas.sent(upstream, sent)
	log.Info("message delivered", "upstream", upstream, "provider_id", id, "rcpt_count", len(rcpts),
		"attempts", env.Attempts+1, "duration", took.Round(time.Millisecond).String())
}
