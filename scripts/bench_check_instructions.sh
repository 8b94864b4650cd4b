#!/usr/bin/env bash
# Instructions a tally server executes per HTTP check, counted by valgrind's callgrind:
# the count is the same from run to run whatever else the machine is doing, where req/s
# and CPU time swing with the other load. For each binary in turn (A B A B …, one data
# directory with --limits limits set up once by A), the server runs under callgrind with
# instrumentation off, takes a 2 s warm-up of checks, then instrumentation is switched on
# for a --duration run of `tally-load --scenario check` at --conns connections and off
# again. Prints instructions / checks answered.
#
# Usage: scripts/bench_check_instructions.sh --a BIN --b BIN --load BIN [--rounds N]
#            [--duration S] [--conns N] [--limits N] [--port P]
set -euo pipefail

A="" B="" LOAD="" ROUNDS=2 DURATION=10 CONNS=4 LIMITS=10000 PORT=${PORT:-7497}
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A=$2; shift 2 ;;
        --b) B=$2; shift 2 ;;
        --load) LOAD=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
    esac
done
[ -n "$A" ] && [ -n "$B" ] && [ -n "$LOAD" ] || { echo "--a, --b and --load are required" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/tally-ir-ab.XXXXXX)
SERVER=""
stop_server() {
    if [ -n "$SERVER" ]; then
        kill -INT "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=""
    fi
}
trap 'stop_server; rm -rf "$WORK"' EXIT
wait_up() {
    for _ in $(seq 1200); do
        curl -sf "$URL/healthz" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "the server did not start" >&2
    exit 1
}

"$A" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" >"$WORK/setup.log" 2>&1 &
SERVER=$!
wait_up
"$LOAD" --url "$URL" --scenario check --setup --limits "$LIMITS" --duration-secs 1 \
    --warmup-secs 0 >/dev/null
stop_server

for round in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A
        [ "$side" = B ] && bin=$B
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.%p" \
            "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
            >"$WORK/$side.log" 2>&1 &
        SERVER=$!
        wait_up
        "$LOAD" --url "$URL" --scenario check --connections "$CONNS" --duration-secs 2 \
            --warmup-secs 0 >/dev/null
        callgrind_control -i on "$SERVER" >/dev/null 2>&1
        out=$("$LOAD" --url "$URL" --scenario check --connections "$CONNS" \
            --duration-secs "$DURATION" --warmup-secs 0 --json)
        callgrind_control -i off "$SERVER" >/dev/null 2>&1
        stop_server
        ir=$(grep -E 'Collected :' "$WORK/$side.log" | tail -1 | awk '{gsub(",", "", $NF); print $NF}')
        python3 -c 'import json, sys
r = json.loads(sys.argv[1]); n = r["requests"]; ir = int(sys.argv[3])
print(f"{sys.argv[2]} round {sys.argv[4]}: {n} checks, {ir} instructions, {ir / n:.0f} per check")' \
            "$out" "$side" "$ir" "$round"
        rm -f "$WORK"/cg.*
    done
done
