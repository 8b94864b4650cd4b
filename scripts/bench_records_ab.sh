#!/usr/bin/env bash
# Durable records/s of two tally binaries side by side (A/B), on loopback.
#
# Starts both servers (fresh data directories, ports 7381 and 7382), creates the same
# --limits limits on each, then runs `tally-load --scenario record` against A and B in
# alternation, once per connection count per round, and prints every run and the median
# per binary and connection count. Stops both servers on exit.
#
# Usage: scripts/bench_records_ab.sh A_TALLY B_TALLY TALLY_LOAD [--rounds N]
#            [--conns "1 32 128"] [--duration S] [--limits N]
set -euo pipefail
A=$1 B=$2 LOAD=$3; shift 3
ROUNDS=3 CONNS="1 32 128" DURATION=5 LIMITS=100000
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d /tmp/tally-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
start() { # name binary port
    "$2" serve --listen "127.0.0.1:$3" --data-dir "$WORK/$1" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$3/healthz" >/dev/null && return; sleep 0.1; done
    echo "server $1 did not start" >&2; cat "$WORK/$1.log" >&2; exit 1
}
start A "$A" 7381
start B "$B" 7382
for port in 7381 7382; do
    timeout 600 "$LOAD" --url "http://127.0.0.1:$port" --scenario check --setup --limits "$LIMITS" \
        --duration-secs 1 --warmup-secs 0 >/dev/null
done
for r in $(seq "$ROUNDS"); do
    for c in $CONNS; do
        for ab in A B; do
            port=$([ $ab = A ] && echo 7381 || echo 7382)
            rps=$(timeout 120 "$LOAD" --url "http://127.0.0.1:$port" --scenario record \
                --connections "$c" --duration-secs "$DURATION" --warmup-secs 1 |
                tr ' ' '\n' | sed -n 's/^rps=//p')
            echo "round=$r conns=$c bin=$ab rps=$rps" | tee -a "$WORK/runs"
        done
    done
done
echo "median records/s:"
for c in $CONNS; do
    for ab in A B; do
        m=$(grep " conns=$c bin=$ab " "$WORK/runs" | sed 's/.*rps=//' | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
        printf "conns=%s %s=%s\n" "$c" "$ab" "$m"
    done
done
