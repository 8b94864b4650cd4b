#!/usr/bin/env bash
# The dashboard's browser tests: a real Chromium (Debian's `chromium`) driven by Playwright
# (PyPI, pinned in requirements.txt, in a venv under target/) against the real `tally`
# binary, with nginx (Debian's `nginx-light`) as the reverse proxy with a path prefix.
# Installs what is missing, builds the release binary, runs pytest. Extra arguments go to
# pytest (e.g. `-k screenshots`).
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
[ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null || missing+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv=target/browser-venv
if ! "$venv/bin/python" -c 'import playwright, pytest' 2>/dev/null \
    || ! cmp -s tests/browser/requirements.txt "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/browser/requirements.txt
    cp tests/browser/requirements.txt "$venv/requirements.txt"
fi

cargo build --release -p tally-server --bin tally
export PYTHONDONTWRITEBYTECODE=1
export TALLY_BIN="${TALLY_BIN:-$PWD/target/release/tally}"
exec "$venv/bin/python" -m pytest tests/browser -q -p no:cacheprovider "$@"
