#!/usr/bin/env bash
# Schemathesis (PyPI, pinned in requirements.txt, in a venv under target/) against the real
# `tally` binary: a node on loopback with an admin and a client token and a temporary data
# directory, tested from its own GET /openapi.json with the admin token. First the served
# document is checked: the committed docs/openapi.json, valid OpenAPI 3.1
# (openapi-spec-validator, pinned too). Every operation,
# the examples, coverage, fuzzing (positive and negative data) and stateful phases, every
# check. It fails on any 5xx, any response the document does not allow, any crash.
#
# Bounded in time: --max-examples per operation (default 60, `ST_MAX_EXAMPLES`), so a run
# takes a few minutes on 2 cores. The summary at the end says how many test cases were
# generated. Extra arguments go to `st run` (e.g. `--seed 1`).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/schemathesis-venv
if ! "$venv/bin/st" --version >/dev/null 2>&1 \
    || ! cmp -s tests/schemathesis/requirements.txt "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/schemathesis/requirements.txt
    cp tests/schemathesis/requirements.txt "$venv/requirements.txt"
fi
"$venv/bin/st" --version
"$venv/bin/pip" show openapi-spec-validator | sed -n 's/^Version: /openapi-spec-validator /p'

bin="${TALLY_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release -p tally-server --bin tally
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tally"
fi

work=$(mktemp -d)
node_pid=""
cleanup() {
    if [ -n "$node_pid" ]; then
        kill "$node_pid" 2>/dev/null || true
        wait "$node_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

admin=st-admin-token
client=st-client-token
"$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    --admin-token "$admin" --client-token "$client" >"$work/out" 2>"$work/err" &
node_pid=$!
url=""
for _ in $(seq 100); do
    url=$(sed -n 's/^tally listening on \(http:[^ ]*\).*/\1/p' "$work/out")
    [ -n "$url" ] && break
    kill -0 "$node_pid" 2>/dev/null || { cat "$work/err"; echo "tally serve exited"; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { cat "$work/err"; echo "tally serve did not start"; exit 1; }
echo "node at $url"

# The served document is the committed one, and it is valid OpenAPI 3.1.
"$venv/bin/python" -c 'import sys, urllib.request
with urllib.request.urlopen(sys.argv[1]) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())' "$url/openapi.json" "$work/openapi.json"
cmp "$work/openapi.json" docs/openapi.json \
    || { echo "GET /openapi.json differs from docs/openapi.json"; exit 1; }
"$venv/bin/python" -m openapi_spec_validator "$work/openapi.json"

# One worker: with two threads, Hypothesis' lambda descriptions call ast.parse concurrently,
# which CPython 3.11 (up to 3.11.8 at least: "AST constructor recursion depth mismatch")
# does not survive; the run then ends in a Runtime Error of the tool, not of tally.
# Every check runs: Schemathesis enables all 14 by default. (`--checks all` on the command
# line would also override the per-operation settings of schemathesis.toml.)
status=0
"$venv/bin/st" --config-file tests/schemathesis/schemathesis.toml run "$url/openapi.json" \
    --header "Authorization: Bearer $admin" \
    --phases examples,coverage,fuzzing,stateful \
    --mode all \
    --max-examples "${ST_MAX_EXAMPLES:-60}" \
    --workers 1 \
    --request-timeout 15 \
        --warnings off \
    "$@" || status=$?

if ! kill -0 "$node_pid" 2>/dev/null; then
    echo "tally serve crashed during the run:"; tail -50 "$work/err"
    exit 1
fi
if grep -q 'panicked' "$work/err"; then
    echo "tally serve panicked during the run:"; grep -A5 'panicked' "$work/err"
    exit 1
fi
exit "$status"
