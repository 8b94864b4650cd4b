#!/usr/bin/env bash
# tally vs an HTTP floor vs a central Redis, side by side, on this machine (issue 7).
#
# One run measures, with the same load generator (tally-load), the same connection counts,
# the same duration, in alternating order (each round runs every system once per
# connection count before the next round starts):
#
#   check   floor     tally-floor: axum parses the check body, bumps one atomic, replies
#           tally     tally serve, POST /v1/check, 5 applicable limits among --limits
#           redis     redis-server (no persistence), EVALSHA of a Lua check-and-increment
#                     over the same 5 limits (MGET 5 counters + 5 maxima, INCRBY 5)
#           embedded  tally_node::Node::check in the load generator's process (no HTTP)
#   record  tally     POST /v1/usage, acknowledged after fsync (group commit)
#           redis     redis-server --appendonly yes --appendfsync always, EVALSHA of a Lua
#                     script: SET dedup-id NX EX 86400, then INCRBY the 5 counters
#           embedded  tally_node::Node::record(..).await in process (durable when it returns)
#
# and prints a table of req/s, p50, p99 (median over rounds) with ratios to the floor and to
# Redis, then the goals (tally check >= 0.9x floor and >= 1.2x Redis; tally durable record
# >= 1.5x Redis appendfsync always).
#
# Installs redis-server from Debian's package if it is missing (apt-get update once, then
# apt-get install -y redis-server). Starts every server on loopback, and stops every server
# it started on exit, whatever happens. Every step runs under `timeout`.
#
# Usage: scripts/bench_vs_redis.sh [--duration S] [--warmup S] [--rounds N]
#            [--conns "1 32 128"] [--limits N] [--no-build] [--keep DIR]
# Ports (loopback): TALLY_PORT=7391 FLOOR_PORT=7392 REDIS_PORT=7393 REDIS_AOF_PORT=7394.
set -euo pipefail

DURATION=5
WARMUP=1
ROUNDS=2
CONNS="1 32 128"
LIMITS=100000
BUILD=1
KEEP=""
TALLY_PORT=${TALLY_PORT:-7391}
FLOOR_PORT=${FLOOR_PORT:-7392}
REDIS_PORT=${REDIS_PORT:-7393}
REDIS_AOF_PORT=${REDIS_AOF_PORT:-7394}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --limits) LIMITS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release
WORK=$(mktemp -d /tmp/tally-vs-redis.XXXXXX)
PIDS=()  # servers this script started
JOBS=()  # load generator runs that may still be going when the script is stopped
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local status=$?
    for pid in "${JOBS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded: a server that ignores SIGTERM for 10 s gets SIGKILL.
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP"
        cp "$WORK"/*.log "$WORK"/results.txt "$KEEP"/ 2>/dev/null || true
        log "logs and raw results kept in $KEEP"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port, pid, name
    for _ in $(seq 300); do
        port_in_use "$1" && return 0
        kill -0 "$2" 2>/dev/null || { log "$3 exited; its log:"; cat "$WORK/$3.log" >&2; return 1; }
        sleep 0.1
    done
    log "$3 did not listen on $1 within 30 s"; return 1
}

# --- build and install ------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    log "building release binaries (tally, tally-load, tally-floor)"
    (cd "$ROOT" && timeout 1800 cargo build --release --quiet \
        -p tally-server -p tally-load -p tally-bench)
fi
for bin in tally tally-load tally-floor; do
    [ -x "$BIN/$bin" ] || { log "missing $BIN/$bin (run without --no-build)"; exit 1; }
done
if ! command -v redis-server >/dev/null; then
    log "installing redis-server from Debian's package"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq redis-server >&2
fi

for port in "$TALLY_PORT" "$FLOOR_PORT" "$REDIS_PORT" "$REDIS_AOF_PORT"; do
    if port_in_use "$port"; then
        log "127.0.0.1:$port is in use; set TALLY_PORT/FLOOR_PORT/REDIS_PORT/REDIS_AOF_PORT"
        exit 1
    fi
done

# --- servers ----------------------------------------------------------------------------
mkdir -p "$WORK/redis-mem" "$WORK/redis-aof"
"$BIN/tally-floor" --listen "127.0.0.1:$FLOOR_PORT" >"$WORK/floor.log" 2>&1 &
FLOOR_PID=$!; PIDS+=("$FLOOR_PID"); wait_port "$FLOOR_PORT" "$FLOOR_PID" floor
"$BIN/tally" serve --listen "127.0.0.1:$TALLY_PORT" --data-dir "$WORK/tally-data" \
    >"$WORK/tally.log" 2>&1 &
TALLY_PID=$!; PIDS+=("$TALLY_PID"); wait_port "$TALLY_PORT" "$TALLY_PID" tally
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
    --save '' --appendonly no --dir "$WORK/redis-mem" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID"); wait_port "$REDIS_PORT" "$REDIS_PID" redis
redis-server --bind 127.0.0.1 --port "$REDIS_AOF_PORT" --protected-mode yes \
    --save '' --appendonly yes --appendfsync always --dir "$WORK/redis-aof" \
    >"$WORK/redis-aof.log" 2>&1 &
REDIS_AOF_PID=$!; PIDS+=("$REDIS_AOF_PID"); wait_port "$REDIS_AOF_PORT" "$REDIS_AOF_PID" redis-aof
log "servers up: floor :$FLOOR_PORT pid $FLOOR_PID, tally :$TALLY_PORT pid $TALLY_PID, redis :$REDIS_PORT pid $REDIS_PID, redis-aof :$REDIS_AOF_PORT pid $REDIS_AOF_PID"

LOAD=("$BIN/tally-load")
TALLY_URL=http://127.0.0.1:$TALLY_PORT
EMBEDDED_DIR=$WORK/embedded-data

# --- setup: the same limit set everywhere (in parallel; not measured) ---------------------
log "setup: $LIMITS limits on tally (HTTP), in the embedded node's directory, and in Redis"
ONE_SHOT=(--scenario check --connections 1 --duration-secs 0.1 --warmup-secs 0)
timeout 900 "${LOAD[@]}" --url "$TALLY_URL" --setup --limits "$LIMITS" "${ONE_SHOT[@]}" \
    >"$WORK/setup-tally.out" 2>"$WORK/setup-tally.log" &
setup_tally=$!; JOBS+=("$setup_tally")
timeout 900 "${LOAD[@]}" --mode embedded --data-dir "$EMBEDDED_DIR" --setup \
    --limits "$LIMITS" "${ONE_SHOT[@]}" >"$WORK/setup-embedded.out" 2>"$WORK/setup-embedded.log" &
setup_embedded=$!; JOBS+=("$setup_embedded")
timeout 300 "${LOAD[@]}" --mode redis --url "redis://127.0.0.1:$REDIS_PORT" --setup \
    --limits "$LIMITS" "${ONE_SHOT[@]}" >"$WORK/setup-redis.out" 2>"$WORK/setup-redis.log"
for name in tally embedded; do
    pid_var=setup_$name
    wait "${!pid_var}" || { log "setup of $name failed:"; cat "$WORK/setup-$name.log" >&2; exit 1; }
done
JOBS=()
grep -h '^setup' "$WORK"/setup-*.log >&2 || true
if grep -q WARNING "$WORK"/setup-*.log; then
    log "a setup probe did not see 5 applicable limits"; exit 1
fi

# --- measured runs, alternating ------------------------------------------------------------
args_for() { # system -> tally-load arguments
    case "$1" in
        floor) echo "--url http://127.0.0.1:$FLOOR_PORT --scenario raw --path /v1/check" ;;
        tally-check) echo "--url $TALLY_URL --scenario check" ;;
        redis-check) echo "--mode redis --url redis://127.0.0.1:$REDIS_PORT --scenario check" ;;
        embedded-check) echo "--mode embedded --data-dir $EMBEDDED_DIR --scenario check --threads 2" ;;
        tally-record) echo "--url $TALLY_URL --scenario record" ;;
        redis-record) echo "--mode redis --url redis://127.0.0.1:$REDIS_AOF_PORT --scenario record" ;;
        embedded-record) echo "--mode embedded --data-dir $EMBEDDED_DIR --scenario record --threads 2" ;;
    esac
}
server_pid() { # system -> the server process it loads, none for embedded
    case "$1" in
        floor) echo "$FLOOR_PID" ;;
        tally-*) echo "$TALLY_PID" ;;
        redis-check) echo "$REDIS_PID" ;;
        redis-record) echo "$REDIS_AOF_PID" ;;
    esac
}
# utime + stime of a process in USER_HZ ticks (10 ms; fields 14 and 15 of /proc/PID/stat).
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

SYSTEMS="floor tally-check redis-check embedded-check tally-record redis-record embedded-record"
RESULTS=$WORK/results.txt
: >"$RESULTS"
RUN_TIMEOUT=$(awk -v d="$DURATION" -v w="$WARMUP" 'BEGIN { printf "%d", d + w + 60 }')
UPTIME_START=$(uptime)
log "load before the runs: $UPTIME_START"
for round in $(seq "$ROUNDS"); do
    for conns in $CONNS; do
        for system in $SYSTEMS; do
            # shellcheck disable=SC2046 # args_for's words are meant to split
            timeout "$RUN_TIMEOUT" "${LOAD[@]}" $(args_for "$system") \
                --connections "$conns" --duration-secs "$DURATION" \
                --warmup-secs "$WARMUP" >"$WORK/run.out" 2>>"$WORK/runs.log" &
            load_pid=$!; JOBS=("$load_pid")
            # The server's CPU over the measured window: sampled when the warmup ends and
            # when the run does (tally-load stops at the window's end).
            pid=$(server_pid "$system")
            sleep "$WARMUP"
            [ -n "$pid" ] && before=$(cpu_ticks "$pid")
            if wait "$load_pid"; then
                line=$(cat "$WORK/run.out")
                if [ -n "$pid" ]; then
                    after=$(cpu_ticks "$pid")
                    requests=$(echo "$line" | grep -o 'requests=[0-9]*' | cut -d= -f2)
                    line="$line srv_cpu_us=$(awk -v t=$((after - before)) -v n="$requests" \
                        'BEGIN { printf "%.2f", (n > 0) ? t * 10000 / n : -1 }')"
                fi
            else
                line="failed=1"
            fi
            echo "system=$system round=$round $line" >>"$RESULTS"
            log "round $round/$ROUNDS conns=$conns $system: $(echo "$line" | grep -o 'rps=[^ ]*\|p99_us=[^ ]*\| cpu_us=[^ ]*\|srv_cpu_us=[^ ]*\|failed=1' | tr '\n' ' ')"
        done
    done
done
UPTIME_END=$(uptime)

# --- report --------------------------------------------------------------------------------
echo
echo "## tally vs floor vs Redis ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr); $(redis-server --version | cut -d' ' -f1-3)"
echo "runs: ${DURATION}s measured + ${WARMUP}s warmup each, $ROUNDS rounds, alternating; median over rounds"
echo "load average before: ${UPTIME_START##*load average: }; after: ${UPTIME_END##*load average: }"
echo
awk -v conns_list="$CONNS" '
function field(name,   i, kv) {
    for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] }
    return ""
}
function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    s = field("system"); c = field("conns")
    if (field("failed") != "") { failed[s] = failed[s] + 1; next }
    key = s SUBSEP c
    rps[key] = rps[key] " " field("rps"); p50[key] = p50[key] " " field("p50_us")
    p99[key] = p99[key] " " field("p99_us")
    srv[key] = srv[key] " " field("srv_cpu_us"); cli[key] = cli[key] " " field("cpu_us")
}
function cpu(list,   m) { m = median(list); return (m == "" || m < 0) ? "-" : sprintf("%.1f", m) }
function ratio(a, b) { return (a != "" && b != "" && b > 0) ? sprintf("%.2f", a / b) : "-" }
function row(label, s, c, base1, base2,   key, r) {
    key = s SUBSEP c; r = median(rps[key])
    if (r == "") { printf "| %s | %s | failed | | | | | | |\n", label, c; return }
    printf "| %s | %s | %.0f | %.0f | %.0f | %s | %s | %s | %s |\n", label, c, r, median(p50[key]), median(p99[key]), \
        cpu(srv[key]), cpu(cli[key]), \
        ratio(r, median(rps[base1 SUBSEP c])), ratio(r, median(rps[base2 SUBSEP c]))
}
function goal(what, s, base, c, want,   r) {
    r = ratio(median(rps[s SUBSEP c]), median(rps[base SUBSEP c]))
    printf "- %s at %s conns: %s (goal >= %s) %s\n", what, c, r, want, (r != "-" && r + 0 >= want) ? "MET" : "MISSED"
}
END {
    n = split(conns_list, cl, " ")
    print "### check (5 applicable limits among the setup limits)"
    print ""
    print "| system | conns | req/s | p50 us | p99 us | server CPU us/req | client CPU us/req | x floor | x Redis |"
    print "|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) {
        c = cl[i]
        row("floor: axum + serde_json + atomic", "floor", c, "floor", "redis-check")
        row("tally POST /v1/check", "tally-check", c, "floor", "redis-check")
        row("Redis EVALSHA check+incr", "redis-check", c, "floor", "redis-check")
        row("tally embedded Node::check", "embedded-check", c, "floor", "redis-check")
    }
    print ""
    print "### durable record"
    print ""
    print "| system | conns | req/s | p50 us | p99 us | server CPU us/req | client CPU us/req | x Redis AOF always | x floor |"
    print "|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) {
        c = cl[i]
        row("tally POST /v1/usage (group commit)", "tally-record", c, "redis-record", "floor")
        row("Redis EVALSHA record, appendfsync always", "redis-record", c, "redis-record", "floor")
        row("tally embedded Node::record", "embedded-record", c, "redis-record", "floor")
    }
    print ""
    print "### goals"
    print ""
    for (i = 1; i <= n; i++) {
        goal("tally check / floor", "tally-check", "floor", cl[i], 0.9)
        goal("tally check / Redis EVALSHA", "tally-check", "redis-check", cl[i], 1.2)
        goal("tally record / Redis appendfsync always", "tally-record", "redis-record", cl[i], 1.5)
    }
    print ""
    print "server CPU: the server process (all threads) over the window per request; client CPU: the"
    print "load generator process; for embedded rows the client is the whole system (tally in process)."
    for (s in failed) printf "\nWARNING: %d run(s) of %s failed (see runs.log with --keep)\n", failed[s], s
}' "$RESULTS"
