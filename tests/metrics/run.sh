#!/usr/bin/env bash
# /metrics against Prometheus's own checker, and the Grafana dashboard against a real
# scrape (docs/METRICS.md). Run by .ci/run.
#
# Installs Debian's `prometheus` package for `promtool` if it is missing, builds the
# release `tally` binary, starts two real nodes gossiping on loopback (one with
# `--metrics-limits 5`), sends a known amount of traffic, then for each node:
#   - pipes GET /metrics to `promtool check metrics` (format and naming lint; any
#     complaint fails),
#   - asserts the histograms and gauges exist with the exact counts for that traffic
#     (tests/metrics/check.py),
# and checks integrations/grafana/tally.json: well-formed JSON, the panels named in
# docs/METRICS.md, and every metric name its queries use present in the real scrape.
# About 20 s once the binary is built.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

if ! command -v promtool >/dev/null; then
    echo "-- installing promtool (Debian's prometheus package)"
    # Keep the package's init script from starting a Prometheus server.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
promtool --version 2>&1 | head -1

echo "-- cargo build --release --bin tally"
cargo build --release -p tally-server --bin tally
TARGET=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET/release/tally"

exec python3 "$ROOT/tests/metrics/check.py" --bin "$BIN" \
    --dashboard "$ROOT/integrations/grafana/tally.json"
