#!/usr/bin/env bash
# Envoy's rate limit service (gRPC ShouldRateLimit) vs the HTTP check and record, on one
# tally node, same machine, same run (issue 14).
#
# Starts `tally serve` on loopback with --rls-listen, puts --limits limits in it
# (tally-load --setup, as the HTTP rows of BENCHMARKS.md) and imports a ratelimit config
# (domain bench, key `user`: each of 1000 values counted apart). Then, per round, in turn:
#   http check   tally-load --scenario check,  32 connections (memory only)
#   rls hits=0   rls_load --hits 0, 32 streams on 1 HTTP/2 connection (check only)
#   rls hits=0   the same on 32 connections
#   http record  tally-load --scenario record, 32 connections (durable, group commit)
#   rls hits=1   rls_load --hits 1, 32 streams on 1 connection (check + durable record)
# and prints every run and the median per row. Client and server share the 2 cores.
#
# Usage: scripts/bench_rls.sh [--rounds N] [--duration S] [--limits N] [--no-build]
set -euo pipefail
ROUNDS=3
DURATION=5
LIMITS=100000
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release
HTTP_PORT=${HTTP_PORT:-7491}
RLS_PORT=${RLS_PORT:-7492}
WORK=$(mktemp -d /tmp/tally-bench-rls.XXXXXX)
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -q -p tally-server -p tally-load && \
        cargo build --release -q -p tally-rls --example rls_load)
fi
RLS_LOAD=$BIN/examples/rls_load

"$BIN/tally" serve --listen 127.0.0.1:$HTTP_PORT --rls-listen 127.0.0.1:$RLS_PORT \
    --data-dir "$WORK/data" >"$WORK/stdout" 2>"$WORK/stderr" &
PID=$!
for _ in $(seq 100); do grep -q "tally listening" "$WORK/stdout" 2>/dev/null && break; sleep 0.1; done
URL=http://127.0.0.1:$HTTP_PORT
timeout 600 "$BIN/tally-load" --url "$URL" --scenario check --setup --limits "$LIMITS" \
    --connections 32 --duration-secs 1 >/dev/null
cat >"$WORK/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 4000000000}
YAML
"$BIN/tally" import envoy-ratelimit "$WORK/bench.yaml" --url "$URL" >/dev/null
# Create the 1000 wildcard instances before measuring.
timeout 60 "$RLS_LOAD" --addr 127.0.0.1:$RLS_PORT --hits 1 --duration-secs 2 >/dev/null

OUT=$WORK/runs
: >"$OUT"
# The server's user + system CPU time, in clock ticks (1/100 s).
srv_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
run() { # name, command...
    local name=$1; shift
    local line before after
    before=$(srv_ticks)
    line=$(timeout 120 "$@" | tail -1)
    after=$(srv_ticks)
    echo "$name | $line srv_ticks=$((after - before))" | tee -a "$OUT"
}
for r in $(seq "$ROUNDS"); do
    echo "-- round $r (load $(cut -d' ' -f1 /proc/loadavg))"
    run "http check 32 conns" "$BIN/tally-load" --url "$URL" --scenario check --connections 32 --duration-secs "$DURATION"
    run "rls hits=0 32 streams/1 conn" "$RLS_LOAD" --addr 127.0.0.1:$RLS_PORT --hits 0 --streams 32 --connections 1 --duration-secs "$DURATION"
    run "rls hits=0 32 streams/32 conns" "$RLS_LOAD" --addr 127.0.0.1:$RLS_PORT --hits 0 --streams 32 --connections 32 --duration-secs "$DURATION"
    run "http record 32 conns" "$BIN/tally-load" --url "$URL" --scenario record --connections 32 --duration-secs "$DURATION"
    run "rls hits=1 32 streams/1 conn" "$RLS_LOAD" --addr 127.0.0.1:$RLS_PORT --hits 1 --streams 32 --connections 1 --duration-secs "$DURATION"
done
echo "-- medians over $ROUNDS rounds"
python3 - "$OUT" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rest = line.split(" | ", 1)
    f = dict(re.findall(r"(\w+)=([\d.]+)", rest))
    rows.setdefault(name, []).append(f)
base = statistics.median(float(f["rps"]) for f in rows["http check 32 conns"])
def calls(f):
    return float(f.get("requests") or f.get("calls"))
print(f"{'row':34} {'calls/s':>10} {'p50 us':>8} {'p99 us':>8} {'srv cpu us':>10} {'cli cpu us':>10} {'x http check':>12}")
for name, fs in rows.items():
    med = lambda key: statistics.median(float(f.get(key, 0)) for f in fs)
    # Server CPU over the whole run (warm-up included) per measured call: an upper bound.
    srv = statistics.median(float(f["srv_ticks"]) * 10_000 / calls(f) for f in fs)
    rps = med("rps")
    print(f"{name:34} {rps:10.0f} {med('p50_us'):8.0f} {med('p99_us'):8.0f} {srv:10.1f} {med('cpu_us'):10.1f} {rps / base:12.2f}")
ratios = {}
for i in range(len(rows["http check 32 conns"])):
    for name in rows:
        if name.startswith("rls hits=0"):
            ratios.setdefault(name + " / http check", []).append(float(rows[name][i]["rps"]) / float(rows["http check 32 conns"][i]["rps"]))
        if name.startswith("rls hits=1"):
            ratios.setdefault(name + " / http record", []).append(float(rows[name][i]["rps"]) / float(rows["http record 32 conns"][i]["rps"]))
print("-- ratios within each round")
for k, v in ratios.items():
    print(f"{k:55} " + " ".join(f"{x:.2f}" for x in v))
PY
