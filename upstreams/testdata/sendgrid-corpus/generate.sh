#!/usr/bin/env bash
# Regenerates the SendGrid mapping corpus: .eml files written by real client
# libraries (nodemailer's MailComposer and Python's stdlib email package) and,
# next to each, a .want.json that the generator derives from the INPUTS it gave
# the library (never from relaycar's parser). sendgrid_corpus_test.go checks
# that every field of a .want.json survives the SendGrid mapping.
#
# Needs node >= 20, npm (registry access to install nodemailer once) and
# python3. Run from anywhere:  upstreams/testdata/sendgrid-corpus/generate.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nodemailer_version="10.6.0"
# npm installs into the repo's .cache/ (git-ignored).
cache="${RELAYCAR_NPM_CORPUS_DIR:-$(cd "$here/../../.." && pwd)/.cache/npm-corpus}"

mkdir -p "$cache"
if [ "$(cd "$cache" && node -p "try{require('nodemailer/package.json').version}catch(e){''}" 2>/dev/null)" != "$nodemailer_version" ]; then
  (cd "$cache" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --no-audit --no-fund --no-save "nodemailer@$nodemailer_version" >/dev/null)
fi

rm -f "$here"/*.eml "$here"/*.want.json
NODE_PATH="$cache/node_modules" node "$here/gen-nodemailer.cjs" "$here" "$nodemailer_version"
python3 "$here/gen-python.py" "$here"
ls "$here"/*.eml | wc -l | xargs echo "messages written:"
