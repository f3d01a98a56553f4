#!/usr/bin/env bash
# make-spool-fixture.sh: regenerate relay/spool/testdata/v1, a spool written by
# the v1 relaycar binary (format v1: <id>.eml + <id>.json, dead/), which the
# v2 spool's upgrade test (TestV1Fixture) loads, migrates and checks.
#
# The checked-in fixture was made by running, from the repository root:
#
#   tools/make-spool-fixture.sh
#
# which does this:
#   1. Builds relaycar at commit 6bc32fb (the current release, spool format v1)
#      in a temporary git worktree: `go build ./cmd/relaycar`. The worktree is
#      removed afterwards.
#   2. Runs `go run ./tools/spoolfixture -relaycar <that binary>`, which
#      - writes a relay.yaml: SMTP and admin on 127.0.0.1, spool ./spool, retry
#        initial/max 1h (no second attempt meanwhile), one smtp upstream "sink"
#        on 127.0.0.1 (tls: none), routes "partners" (recipient domain
#        partner.example) and "default", both to sink;
#      - starts `relaycar serve` with it, while nothing listens on sink's port;
#      - submits over SMTP (go-smtp client) "queued-1" and "queued-2" to
#        ok@example.net and waits until each .json shows one failed attempt
#        (connection refused): queued, never delivered;
#      - starts the sink (go-smtp server: RCPT ok@ 250, later@ 451 4.2.0,
#        reject@ 550 5.1.1);
#      - submits "partial" (ok@example.net delivered, later@example.net pending
#        after 451), "split" (ok@example.net delivered on route default,
#        later@partner.example pending on route partners) and "dead"
#        (reject@example.net: 550, dead-lettered into dead/), and waits until
#        the .json files show those states;
#      - stops the relay with SIGTERM, waits for it to exit, and copies its
#        spool directory (.lock, *.eml, *.json, dead/) to
#        relay/spool/testdata/v1, replacing what was there.
#   Each message's Subject and Message-ID name it (<fixture-partial@example.com>).
#   Nothing in the fixture holds an absolute path; ids and times are those of
#   the run.
#
# Environment: V1_COMMIT (default 6bc32fb) to build another release,
# V1_BIN=/path/to/relaycar to use a binary already built, OUT (default
# relay/spool/testdata/v1) for the fixture directory.
#
# relay/spool/testdata/v2-1721dd1 (the previous release, spool format v2) was
# made the same way: V1_COMMIT=1721dd1 OUT=relay/spool/testdata/v2-1721dd1
# tools/make-spool-fixture.sh (spoolfixture reads v2 .msg files through the
# spool package). tests/upgrade_test.go delivers both with the current binary.
set -euo pipefail

root=$(git rev-parse --show-toplevel)
cd "$root"
commit=${V1_COMMIT:-6bc32fb}
work=$(mktemp -d "${TMPDIR:-/tmp}/relaycar-v1.XXXXXX")
cleanup() {
	if [ -d "$work/src" ]; then git worktree remove --force "$work/src"; fi
	rm -rf "$work"
}
trap cleanup EXIT

bin=${V1_BIN:-}
if [ -z "$bin" ]; then
	git worktree add --detach "$work/src" "$commit" >/dev/null
	(cd "$work/src" && go build -o "$work/relaycar" ./cmd/relaycar)
	bin=$work/relaycar
fi
"$bin" version
out=${OUT:-relay/spool/testdata/v1}
go run ./tools/spoolfixture -relaycar "$bin" -out "$out"
find "$out" -type f | sort
