#!/usr/bin/env bash
# Check throughput of two tally binaries side by side (A = before a change, B = after),
# on the same data directory, in alternating order, with the same load generator.
# Written for issue 16 (the dashboard's denial ring must cost the check path nothing).
#
# Scenarios, each `tally-load --scenario check` at --conns connections:
#   allowed   every check allowed (5 applicable limits among --limits)
#   denied    every check denied: load-provider-openai, one of the 5, is set to its max
#             first (POST /v1/limits/load-provider-openai/reset {"used": 1e8}), so every
#             check of B also records a denial in its ring
#   dashboard (B only) allowed checks while a dashboard polls GET /v1/limits the way
#             the page does: every max(2 s, 10 x the last fetch)
# and, with --load-a and --load-b (tally-load built from A's and B's sources), the same
# allowed and denied checks in process (`--mode embedded`, `Node::check`, no HTTP), where
# a few nanoseconds per check would show.
#
# HTTP runs also report the server's CPU (user + system, from /proc) per request, a
# steadier measure of cost than req/s when other work shares the machine (issue 13).
#
# Each round starts A, runs every scenario, stops it, then the same for B. Prints one
# line per run and a table of medians with B/A ratios. Other work on the machine moves
# absolute numbers; compare the ratios, measured side by side.
#
# Usage: scripts/bench_check_ab.sh --a BIN --b BIN [--load BIN] [--rounds N]
#            [--duration S] [--warmup S] [--conns N] [--limits N] [--port P]
#            [--load-a BIN --load-b BIN] [--no-dashboard]
# (--no-dashboard skips the dashboard scenario: the GET /v1/limits it may still be
# serving when it stops would otherwise load B's next run.)
set -euo pipefail

A=""
B=""
LOAD=""
LOAD_A=""
LOAD_B=""
ROUNDS=3
DURATION=5
WARMUP=1
CONNS=32
LIMITS=100000
DASHBOARD=1
PORT=${PORT:-7491}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A=$2; shift 2 ;;
        --b) B=$2; shift 2 ;;
        --load) LOAD=$2; shift 2 ;;
        --load-a) LOAD_A=$2; shift 2 ;;
        --load-b) LOAD_B=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --no-dashboard) DASHBOARD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -n "$A" ] && [ -n "$B" ] || { usage >&2; exit 2; }
LOAD=${LOAD:-$ROOT/target/release/tally-load}
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/tally-ab.XXXXXX)
SERVER=""
POLLER=""
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_server() {
    if [ -n "$SERVER" ]; then
        kill "$SERVER" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=""
    fi
}
stop_poller() {
    if [ -n "$POLLER" ]; then
        kill "$POLLER" 2>/dev/null || true
        wait "$POLLER" 2>/dev/null || true
        POLLER=""
    fi
}
cleanup() {
    stop_poller
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT

start_server() { # BIN
    "$1" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" >"$WORK/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 300); do
        curl -sf "$URL/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the server did not start; see $WORK/server.log" >&2
    exit 1
}

# The dashboard's polling loop, as app.js does it (bounded: stopped with the scenario).
poll_like_the_dashboard() {
    while :; do
        local t0 t1 ms wait_ms
        t0=$(date +%s%N)
        curl -sf -o /dev/null "$URL/v1/limits" || true
        t1=$(date +%s%N)
        ms=$(( (t1 - t0) / 1000000 ))
        wait_ms=$(( ms * 10 ))
        [ "$wait_ms" -lt 2000 ] && wait_ms=2000
        [ "$wait_ms" -gt 60000 ] && wait_ms=60000
        echo "$ms" >>"$WORK/poll_ms"
        sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))"
    done
}

# User + system CPU ticks (1/100 s) of the server so far.
server_ticks() {
    awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$SERVER/stat"
}

run_load() { # label
    local out t0 t1
    t0=$(server_ticks)
    out=$(timeout $((DURATION * 4 + 60)) "$LOAD" --url "$URL" --scenario check \
        --connections "$CONNS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" --json)
    t1=$(server_ticks)
    # The server's CPU over warm-up and measured window, in ticks.
    out="${out%\}},\"server_ticks\":$((t1 - t0))}"
    echo "$1 $out" >>"$WORK/results"
    log "$1 $out"
}

log "setting up $LIMITS limits with A ($A)"
start_server "$A"
timeout 900 "$LOAD" --url "$URL" --scenario check --setup --limits "$LIMITS" \
    --duration-secs 1 --warmup-secs 0 >/dev/null
stop_server

for round in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A
        [ "$side" = B ] && bin=$B
        start_server "$bin"
        # Each server starts from the same state: the denying limit back to 0.
        curl -sf -X POST "$URL/v1/limits/load-provider-openai/reset" -d '{}' >/dev/null
        run_load "$side allowed"
        if [ "$side" = B ] && [ "$DASHBOARD" = 1 ]; then
            poll_like_the_dashboard &
            POLLER=$!
            run_load "$side dashboard"
            stop_poller
        fi
        curl -sf -X POST "$URL/v1/limits/load-provider-openai/reset" -d '{"used": 100000000}' >/dev/null
        run_load "$side denied"
        curl -sf -X POST "$URL/v1/limits/load-provider-openai/reset" -d '{}' >/dev/null
        if [ "$side" = B ]; then
            denials=$(curl -sf "$URL/v1/denials?limit=1")
            log "B denials after the run: ${denials:0:160}..."
        fi
        stop_server
    done
done

if [ -n "$LOAD_A" ] && [ -n "$LOAD_B" ]; then
    # A copy of the data directory where every check is denied.
    cp -a "$WORK/data" "$WORK/data-denied"
    mv "$WORK/data" "$WORK/data-allowed"
    ln -s "$WORK/data-denied" "$WORK/data"
    start_server "$B"
    curl -sf -X POST "$URL/v1/limits/load-provider-openai/reset" -d '{"used": 100000000}' >/dev/null
    stop_server
    for round in $(seq "$ROUNDS"); do
        for side in A B; do
            load=$LOAD_A
            [ "$side" = B ] && load=$LOAD_B
            for scenario in allowed denied; do
                out=$(timeout $((DURATION * 4 + 120)) "$load" --mode embedded \
                    --data-dir "$WORK/data-$scenario" --scenario check \
                    --connections "$CONNS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" --json)
                echo "$side embedded-$scenario $out" >>"$WORK/results"
                log "$side embedded-$scenario $out"
            done
        done
    done
fi

python3 - "$WORK/results" "$WORK/poll_ms" "$WARMUP" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    side, scenario, js = line.split(" ", 2)
    rows.setdefault((scenario, side), []).append(json.loads(js))
def med(runs, key):
    return statistics.median(r[key] for r in runs)
for (scenario, side), runs in rows.items():
    bad = [r for r in runs if r["errors"]]
    if bad:
        sys.exit(f"{side} {scenario}: runs with errors: {bad}")
def srv_us(r):
    # Server CPU per measured request, warm-up included (so comparable only between runs
    # of the same warm-up and duration); None for embedded runs.
    if "server_ticks" not in r or not r["requests"]:
        return None
    return r["server_ticks"] * 10_000 / r["requests"] * r["secs"] / (r["secs"] + WARMUP)
WARMUP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
def med_cpu(runs):
    v = [srv_us(r) for r in runs if srv_us(r) is not None]
    return statistics.median(v) if v else None
print(f"{'scenario':16} {'side':4} {'runs':>4} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'srv µs/req':>10}  B/A req/s  B/A srv cpu")
for scenario in ("allowed", "denied", "dashboard", "embedded-allowed", "embedded-denied"):
    a = rows.get((scenario, "A"))
    for side in ("A", "B"):
        runs = rows.get((scenario, side))
        if not runs:
            continue
        rps = med(runs, "rps")
        ratio = f"{rps / med(a, 'rps'):.3f}" if side == "B" and a else ""
        if side == "B" and not a:
            ratio = f"{rps / med(rows[('allowed', 'A')], 'rps'):.3f} (vs A allowed)"
        cpu = med_cpu(runs)
        cpu_s = f"{cpu:>10.2f}" if cpu is not None else f"{'-':>10}"
        cpu_ratio = ""
        if side == "B" and a and cpu is not None and med_cpu(a):
            cpu_ratio = f"{cpu / med_cpu(a):.3f}"
        print(f"{scenario:16} {side:4} {len(runs):>4} {rps:>10.0f} {med(runs, 'p50_us') / 1000:>8.2f} {med(runs, 'p99_us') / 1000:>8.2f} {cpu_s}  {ratio:9}  {cpu_ratio}")
try:
    polls = [int(x) for x in open(sys.argv[2])]
    print(f"dashboard polls: {len(polls)}, GET /v1/limits median {statistics.median(polls)} ms")
except FileNotFoundError:
    pass
EOF
