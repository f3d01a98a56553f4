#!/usr/bin/env bash
# Local Amazon SES v2 emulator (npm aws-ses-v2-local) for the SES adapter tests.
#
#   scripts/ses-emulator.sh install   install it into <repo>/.cache/npm (idempotent)
#   scripts/ses-emulator.sh path      print the cli.js path the tests run
#
# RELAYCAR_SES_EMULATOR_DIR overrides the install prefix (default <repo>/.cache/npm);
# the Go test reads the same variable. No global install, nothing else is written.
set -euo pipefail

PKG=aws-ses-v2-local
VERSION=2.10.2

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${RELAYCAR_SES_EMULATOR_DIR:-$repo/.cache/npm}"
cli="$prefix/node_modules/$PKG/dist/cli.js"

installed_version() {
	local pj="$prefix/node_modules/$PKG/package.json"
	[[ -f "$pj" && -f "$cli" ]] || return 0
	node -p "require(process.argv[1]).version" "$pj" 2>/dev/null || true
}

case "${1:-}" in
install)
	command -v node >/dev/null || { echo "ses-emulator: node is required (apt-get install nodejs npm)" >&2; exit 1; }
	command -v npm >/dev/null || { echo "ses-emulator: npm is required (apt-get install npm)" >&2; exit 1; }
	if [[ "$(installed_version)" == "$VERSION" ]]; then
		echo "ses-emulator: $PKG@$VERSION already in $prefix"
		exit 0
	fi
	mkdir -p "$prefix"
	# Keep the cache out of git without touching the repo's .gitignore.
	if [[ -z "${RELAYCAR_SES_EMULATOR_DIR:-}" && ! -e "$repo/.cache/.gitignore" ]]; then
		printf '*\n' >"$repo/.cache/.gitignore"
	fi
	[[ -f "$prefix/package.json" ]] || printf '{"name":"relaycar-test-tools","private":true}\n' >"$prefix/package.json"
	npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "$PKG@$VERSION"
	[[ -f "$cli" ]] || { echo "ses-emulator: install finished but $cli is missing" >&2; exit 1; }
	echo "ses-emulator: installed $PKG@$VERSION in $prefix"
	;;
path)
	echo "$cli"
	;;
*)
	echo "usage: $0 install|path" >&2
	exit 2
	;;
esac
