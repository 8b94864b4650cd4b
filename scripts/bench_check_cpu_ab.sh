#!/usr/bin/env bash
# Check throughput and the server's CPU time per check of two tally binaries side by side
# (A = before a change, B = after), on one data directory, A then B, then B then A, …,
# with one load generator. Written for issue 13 (the typed wire schema must not slow the
# check): on a shared machine req/s swings by ±30% from run to run, while the server's CPU
# time per request (utime + stime from /proc/PID/stat, over the whole run) moves much less.
#
# Usage: scripts/bench_check_cpu_ab.sh --a BIN --b BIN --load BIN [--rounds N]
#            [--duration S] [--conns N] [--limits N] [--port P]
set -euo pipefail

A="" B="" LOAD="" ROUNDS=5 DURATION=5 CONNS=32 LIMITS=100000 PORT=${PORT:-7493}
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
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/tally-cpu-ab.XXXXXX)
SERVER=""
stop_server() {
    if [ -n "$SERVER" ]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=""
    fi
}
trap 'stop_server; rm -rf "$WORK"' EXIT
start_server() {
    "$1" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" >"$WORK/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 300); do
        curl -sf "$URL/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the server did not start; see $WORK/server.log" >&2
    exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }

start_server "$A"
timeout 900 "$LOAD" --url "$URL" --scenario check --setup --limits "$LIMITS" \
    --duration-secs 1 --warmup-secs 0 >/dev/null
stop_server

hz=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
    # A then B in odd rounds, B then A in even ones: neither side always runs second.
    order="A B"
    [ $((round % 2)) = 0 ] && order="B A"
    for side in $order; do
        bin=$A
        [ "$side" = B ] && bin=$B
        start_server "$bin"
        # Warm up (connections, caches), then measure a run from the server's side too.
        "$LOAD" --url "$URL" --scenario check --connections "$CONNS" --duration-secs 1 \
            --warmup-secs 0 --json >/dev/null
        before=$(cpu_ticks)
        out=$("$LOAD" --url "$URL" --scenario check --connections "$CONNS" \
            --duration-secs "$DURATION" --warmup-secs 0 --json)
        after=$(cpu_ticks)
        stop_server
        python3 - "$side" "$round" "$before" "$after" "$hz" "$out" <<'EOF' | tee -a "$WORK/rows"
import json, sys
side, rnd, before, after, hz, out = sys.argv[1:]
r = json.loads(out)
cpu_us = (int(after) - int(before)) / int(hz) * 1e6 / r["requests"]
print(f"{side} {rnd} {r['rps']:.0f} {cpu_us:.2f} {r['p99_us']:.0f}")
EOF
    done
done
python3 - "$WORK/rows" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for side in "AB":
    rps = [float(r[2]) for r in rows if r[0] == side]
    cpu = [float(r[3]) for r in rows if r[0] == side]
    p99 = [float(r[4]) for r in rows if r[0] == side]
    med[side] = (statistics.median(rps), statistics.median(cpu), statistics.median(p99))
    print(f"{side}: median {med[side][0]:.0f} req/s, {med[side][1]:.2f} server CPU us/check, "
          f"p99 {med[side][2] / 1000:.2f} ms over {len(rps)} runs")
print(f"B/A: req/s {med['B'][0] / med['A'][0]:.3f}, CPU per check {med['B'][1] / med['A'][1]:.3f}")
EOF
