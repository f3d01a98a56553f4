#!/usr/bin/env bash
# Installs what `make test` needs beyond Go: Node.js/npm (from Debian when
# missing) and the SES v2 emulator (npm, into .cache/). Idempotent.
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
./scripts/ses-emulator.sh install
go mod download
