#!/usr/bin/env bash
# Instructions the server executes per HTTP check, A (before a change) against B (after),
# under callgrind: deterministic where timings on a shared machine are not. Written for
# issue 13 (the check's latency histogram must not slow the check).
#
# Sets up --limits limits (5 apply to every check, as tally-load's workload) with A run
# normally, then for each binary: starts it under `valgrind --tool=callgrind`, sends
# --warm checks on one keep-alive connection, dumps the counters, sends --n more, dumps
# again, and prints (Ir after − Ir before) / n: the instructions of one check in steady
# state, everything the server does for it (hyper, axum, the check, the reply).
#
# Usage: scripts/bench_check_ir.sh --a BIN --b BIN --load TALLY_LOAD [--n N] [--warm N]
#            [--limits N] [--port P] [--usage]
# With --usage it sends durable usage records (unique ids, one at a time) instead of
# checks: instructions per record, the writer thread and the fsync's syscall included.
set -euo pipefail

A=""
B=""
LOAD=""
N=4000
WARM=2000
LIMITS=1000
PORT=${PORT:-7493}
WHAT=check
while [ $# -gt 0 ]; do
    case "$1" in
        --usage) WHAT=usage; shift ;;
        --a) A=$2; shift 2 ;;
        --b) B=$2; shift 2 ;;
        --load) LOAD=$2; shift 2 ;;
        --n) N=$2; shift 2 ;;
        --warm) WARM=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$A" ] && [ -n "$B" ] && [ -n "$LOAD" ] || { sed -n '2,14p' "$0"; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/tally-ir.XXXXXX)
SERVER=""
cleanup() {
    if [ -n "$SERVER" ]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_up() {
    for _ in $(seq 600); do
        curl -sf "$URL/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the server did not start" >&2
    exit 1
}

"$A" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" >"$WORK/setup.log" 2>&1 &
SERVER=$!
wait_up
"$LOAD" --url "$URL" --scenario check --setup --limits "$LIMITS" --duration-secs 1 --warmup-secs 0 >/dev/null
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""

# N checks on one keep-alive connection, with tally-load's check body.
send() {
    python3 - "$PORT" "$1" "$WHAT" "$2" <<'EOF'
import http.client, json, sys
port, n, what, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
attrs = {"virtual_key": "vk-0", "team": "team-0", "customer": "cust-0",
         "provider": "openai", "model": "gpt-4o"}
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    if what == "usage":
        body = json.dumps({"id": f"ir-{tag}-{i}", "attributes": attrs, "cost": 0.0001, "tokens": 10})
    else:
        body = json.dumps({"attributes": attrs, "cost": 0.0001, "tokens": 10})
    c.request("POST", "/v1/" + what, body, {"Content-Type": "application/json"})
    r = c.getresponse()
    reply = json.loads(r.read())
    assert r.status == 200 and len(reply["limits"]) == 5, (r.status, reply)
EOF
}

total_ir() { # callgrind.out file -> Ir
    grep -E '^(summary|totals):' "$1" | tail -1 | awk '{print $2}'
}

for side in A B; do
    bin=$A
    [ "$side" = B ] && bin=$B
    rm -f "$WORK"/callgrind.out.*
    valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p" \
        "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" >"$WORK/$side.log" 2>&1 &
    SERVER=$!
    wait_up
    send "$WARM" "$side-warm"
    callgrind_control -d "$SERVER" >/dev/null
    sleep 1
    send "$N" "$side"
    callgrind_control -d "$SERVER" >/dev/null
    sleep 1
    files=$(ls -v "$WORK"/callgrind.out.*.[0-9]* 2>/dev/null || true)
    first=$(echo "$files" | sed -n 1p)
    second=$(echo "$files" | sed -n 2p)
    [ -n "$first" ] && [ -n "$second" ] || { echo "no callgrind dumps: $files" >&2; exit 1; }
    # Each dump holds the counts since the previous one.
    ir=$(total_ir "$second")
    echo "$side $bin: $((ir / N)) instructions per $WHAT ($ir over $N)"
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""
done
