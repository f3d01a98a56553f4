#!/usr/bin/env bash
# Installs what `make test` needs beyond Go: Node.js/npm and redis-server
# (from Debian when missing), the SES v2 emulator (npm) and helm (Go module
# proxy), both into .cache/. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
	if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
		echo "test-deps: installing nodejs and npm from Debian"
		apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
	else
		echo "test-deps: Node.js and npm are required (e.g. apt-get install nodejs npm)" >&2
		exit 1
	fi
fi
# redis-server for the shared rate limit tests; they start and stop their
# own (the package does not start one here: no init system).
if ! command -v redis-server >/dev/null; then
	if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
		echo "test-deps: installing redis-server from Debian"
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
	else
		echo "test-deps: redis-server is required (e.g. apt-get install redis-server)" >&2
		exit 1
	fi
fi
./scripts/ses-emulator.sh install

# helm for the chart tests, built from the Go module proxy (no binary
# downloads), once per checkout.
HELM_VERSION=v3.22.0
if ! [ -x .cache/bin/helm ] || ! [ -f ".cache/bin/.helm-$HELM_VERSION" ]; then
	echo "test-deps: building helm $HELM_VERSION into .cache/bin (about a minute)"
	GOBIN="$PWD/.cache/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	touch ".cache/bin/.helm-$HELM_VERSION"
fi
# staticcheck for `make vet`, pinned (a new release can add checks).
STATICCHECK_VERSION=v0.8.2
if ! [ -x .cache/bin/staticcheck ] || ! [ -f ".cache/bin/.staticcheck-$STATICCHECK_VERSION" ]; then
	echo "test-deps: installing staticcheck $STATICCHECK_VERSION into .cache/bin"
	GOBIN="$PWD/.cache/bin" go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
	touch ".cache/bin/.staticcheck-$STATICCHECK_VERSION"
fi
go mod download
(cd charts/tests && go mod download)
