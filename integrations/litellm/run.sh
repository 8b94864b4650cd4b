#!/usr/bin/env bash
# The LiteLLM plug-in's tests (issue 15), run by .ci/run after integrations/run.sh:
#   - tests/test_plugin.py: the callback's hooks against a real tally node (mapping,
#     403/402/429, retries under the same id across a tally crash, fail open/closed,
#     token kinds priced by tally, the no-price fallback, the spool);
#   - tests/test_e2e.py: two real LiteLLM proxies (mock responses, no network), each on
#     its own node of a two-node tally cluster: a team budget shared by both, 402/403/429
#     on either replica, and `tally prices import` of the price file litellm ships.
# Installs a venv under target/ from the pinned requirements.txt (once), builds tally.
# About two and a half minutes on a busy 2-core machine once the venv exists and tally is
# built (27 tests); pytest is stopped after 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
REQ=integrations/litellm/requirements.txt
VENV="$ROOT/target/litellm-venv"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$VENV/requirements.txt"; then
    echo "-- creating $VENV from $REQ"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
    cp "$REQ" "$VENV/requirements.txt"
fi

if [ -z "${TALLY_BIN:-}" ]; then
    echo "-- cargo build --release -p tally-server --bin tally"
    cargo build --release -q -p tally-server --bin tally
    export TALLY_BIN="$ROOT/target/release/tally"
fi
echo "-- tally: $TALLY_BIN; litellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"

# Every tally node and LiteLLM proxy the tests start is listed here; whatever is still
# running when this script exits (pytest killed, timeout) is stopped.
PIDFILE=$(mktemp)
export TALLY_LITELLM_PIDFILE="$PIDFILE"
cleanup() {
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done < "$PIDFILE"
    rm -f "$PIDFILE"
}
trap cleanup EXIT

cd integrations/litellm/tests
echo "-- pytest $*"
# No network: the proxies read prices from the package, never from GitHub.
LITELLM_LOCAL_MODEL_COST_MAP=True timeout --kill-after=10 480 \
    "$VENV/bin/python" -m pytest -v -p no:cacheprovider "$@"
