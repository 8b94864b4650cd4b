#!/usr/bin/env bash
# End-to-end test of a three-node tally fleet in Docker (docker/compose.yaml):
#
#   0. build tally:local offline (docker/build-offline.sh), start the fleet, wait for
#      /readyz on every node; write a `requests` limit on node 1, wait until every node
#      has it; record usage on all three; every node must report the exact total, and
#      the exact count per origin node;
#   1. partition: disconnect node 3 from the fleet's network, keep writing on both sides,
#      reconnect, expect exact convergence;
#   1b. a hard limit (max 3000 tokens) under the same partition: both sides spend with
#      reservations until denied; the acknowledged total must be <= 3000 and >= 80% of
#      it, with no overrun, and every node must converge to it after the heal;
#   2. crash: SIGKILL node 2 while writers send records to all three nodes, restart it,
#      retry the records whose outcome was unknown on the node they were sent to; every
#      node must count exactly the distinct acknowledged records (none lost, none twice);
#   3. replace node 3 by a new node (tally-4, empty volume, new id and address): it must
#      learn the full total, node 3's usage included (from the surviving nodes);
#   and Docker's health check (GET /healthz via `tally status --health-only`) reports
#   the nodes healthy.
#
# Needs: docker with `docker compose` or docker-compose, curl, python3 (and jq if
# present), the Rust toolchain. Uses its own compose project, free loopback ports, a free
# 10.77.X.0/24 subnet and a throw-away env file with fresh secrets; removes the
# containers, network and volumes on exit. The image tally:local is kept.
#
# Environment: TALLY_E2E_TIMEOUT (seconds, default 900), TALLY_E2E_SKIP_BUILD=1 (use the
# existing image), TALLY_IMAGE (default tally:local), TALLY_E2E_NO_JQ=1 (parse JSON with
# python3 even when jq is installed).
set -euo pipefail

if [[ "${TALLY_E2E_UNDER_TIMEOUT:-}" != 1 ]]; then
    export TALLY_E2E_UNDER_TIMEOUT=1
    # The whole run is bounded; on expiry every process of the run gets SIGTERM (the
    # trap below still tears the fleet down), and SIGKILL 120 s later.
    exec timeout -k 120 "${TALLY_E2E_TIMEOUT:-900}" bash "${BASH_SOURCE[0]}" "$@"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${TALLY_IMAGE:-tally:local}"
LIMIT=e2e-requests
TMP="$(mktemp -d "${TMPDIR:-/tmp}/tally-e2e.XXXXXX")"
PROJECT="tally-e2e-$$-$RANDOM"
STARTED_FLEET=0
SUMMARY_DONE=0
T0_MS=0

# --- output --------------------------------------------------------------------------------
now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $((10#$t / 1000)); }
secs() { printf '%d.%02d' $(($1 / 1000)) $((($1 % 1000) / 10)); }
T0_MS=$(now_ms)
log() { printf '%s [+%7ss] %s\n' "$(date -u +%H:%M:%S)" "$(secs $(($(now_ms) - T0_MS)))" "$*"; }

STEP=""
STEP_START=0
STEPS=()   # "PASS|FAIL  name  duration"
NOTES=()   # convergence timings
step() {
    [[ -z "$STEP" ]] || STEPS+=("PASS  $(printf '%-50s' "$STEP") $(secs $(($(now_ms) - STEP_START)))s")
    STEP="$1"
    STEP_START=$(now_ms)
    log "=== $STEP"
}
note() { NOTES+=("$*"); log "$*"; }

summary() {
    local rc=$1
    ((SUMMARY_DONE)) && return 0
    SUMMARY_DONE=1
    if [[ -n "$STEP" ]]; then
        local r=PASS
        ((rc == 0)) || r=FAIL
        STEPS+=("$r  $(printf '%-50s' "$STEP") $(secs $(($(now_ms) - STEP_START)))s")
    fi
    echo
    echo "==== tally e2e summary (project $PROJECT)"
    local s
    for s in "${STEPS[@]}"; do echo "  $s"; done
    if ((${#NOTES[@]})); then
        echo "  timings:"
        for s in "${NOTES[@]}"; do echo "    $s"; done
    fi
    echo "  total $(secs $(($(now_ms) - T0_MS)))s"
    if ((rc == 0)); then echo "PASS"; else echo "FAIL (exit $rc)"; fi
}

# --- compose ---------------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    COMPOSE=()   # reported below, once the cleanup trap is set
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$HERE/compose.yaml" --env-file "$TMP/env" "$@"; }

dump_logs() {
    ((STARTED_FLEET)) || return 0
    echo "---- container logs (last 200 lines each)"
    compose --profile replace logs --no-color --timestamps --tail=200 2>&1 || true
    echo "---- end of container logs"
}

fail() {
    log "FAIL in step '$STEP': $*"
    dump_logs
    exit 1
}

WRITER_PIDS=()
cleanup() {
    local rc=$?
    set +e
    touch "$TMP/stop" 2>/dev/null
    local p
    for p in "${WRITER_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    summary "$rc"
    if ((STARTED_FLEET)); then
        log "cleanup: compose down -v --remove-orphans"
        compose --profile replace down -v --remove-orphans -t 5 >/dev/null 2>&1 ||
            log "cleanup: compose down failed; remove project $PROJECT by hand"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "FAIL in step '"'"'$STEP'"'"': interrupted (SIGTERM/SIGINT; the overall timeout is ${TALLY_E2E_TIMEOUT:-900}s)"; dump_logs; exit 124' TERM INT
((${#COMPOSE[@]})) || fail "neither 'docker compose' nor docker-compose is available"
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found on PATH"
done

# --- JSON (jq if present, else python3) --------------------------------------------------------
PYJSON='
import json, sys
mode, path = sys.argv[1], sys.argv[2]
d = json.load(open(path))
if mode == "sig":
    print("%s|%s" % (d["used"], ",".join("%s=%s" % kv for kv in sorted(d["nodes"].items()))))
elif mode == "applied":
    print(sum(1 for r in d["results"] if r["applied"]))
elif mode == "field":
    v = d.get(sys.argv[3])
    print("null" if v is None else json.dumps(v))
elif mode == "live":
    print(next((json.dumps(n["live"]) for n in d["nodes"] if n["node_id"] == sys.argv[3]), "null"))
'
HAVE_JQ=0
[[ "${TALLY_E2E_NO_JQ:-0}" == 1 ]] || ! command -v jq >/dev/null 2>&1 || HAVE_JQ=1
json() {
    local mode=$1 file=$2 arg=${3:-}
    if ((HAVE_JQ)); then
        case $mode in
        sig) jq -r '"\(.used)|\(.nodes | to_entries | sort_by(.key) | map("\(.key)=\(.value)") | join(","))"' "$file" ;;
        applied) jq -r '[.results[] | select(.applied)] | length' "$file" ;;
        field) jq -c --arg k "$arg" '.[$k]' "$file" ;;
        live) jq -c --arg n "$arg" '[.nodes[] | select(.node_id == $n) | .live] | if length > 0 then .[0] else null end' "$file" ;;
        esac
    else
        python3 -c "$PYJSON" "$mode" "$file" "$arg"
    fi
}

# --- HTTP (through the loopback ports published on the host) -----------------------------------
declare -A PORT CID IP
# req METHOD NODE PATH TOKEN(admin|client|-) OUT [BODY] -> prints the status (000: no reply)
req() {
    local method=$1 node=$2 path=$3 token=$4 out=$5 body=${6:-}
    local args=(-sS -m 10 -o "$out" -w '%{http_code}' -X "$method")
    [[ "$token" == - ]] || args+=(-H "@$TMP/$token.header")
    [[ -z "$body" ]] || args+=(-H 'content-type: application/json' --data-binary "$body")
    curl "${args[@]}" "http://127.0.0.1:${PORT[$node]}$path" 2>/dev/null || true
}

wait_ready() { # NODE TIMEOUT_S
    local n=$1 start deadline code
    start=$(now_ms)
    deadline=$((start + $2 * 1000))
    while :; do
        code=$(req GET "$n" /readyz - "$TMP/ready.$n")
        [[ "$code" == 200 ]] && break
        (($(now_ms) < deadline)) || fail "$n: /readyz not 200 after $2 s (last: $code)"
        sleep 0.2
    done
    note "$n ready in $(secs $(($(now_ms) - start)))s"
}

# Expected usage per origin node (the limit's "nodes" map) and its total.
declare -A EXP
expected_sig() {
    local total=0 parts=() k
    for k in $(printf '%s\n' "${!EXP[@]}" | LC_ALL=C sort); do
        ((EXP[$k] > 0)) || continue
        total=$((total + EXP[$k]))
        parts+=("$k=${EXP[$k]}")
    done
    local IFS=,
    echo "$total|${parts[*]}"
}

# wait_converged LABEL TIMEOUT_S NODE... : every node's view of the limit must equal the
# expected total and per-origin counts exactly. Exceeding the total is a double count.
wait_converged() {
    local label=$1 limit_s=$2
    shift 2
    local want start deadline n code s line ok total
    want=$(expected_sig)
    total=${want%%|*}
    start=$(now_ms)
    deadline=$((start + limit_s * 1000))
    while :; do
        ok=1
        line=""
        for n in "$@"; do
            code=$(req GET "$n" "/v1/limits/$LIMIT" client "$TMP/view.$n")
            if [[ "$code" == 200 ]]; then s=$(json sig "$TMP/view.$n"); else s="http_$code"; fi
            line+=" $n:$s"
            [[ "$s" == "$want" ]] || ok=0
            if [[ "${s%%|*}" =~ ^[0-9]+$ ]] && ((${s%%|*} > total)); then
                fail "$label: $n counts ${s%%|*} > $total acknowledged (double count): $s"
            fi
        done
        if ((ok)); then
            note "$label: ${*} converged to used=$total ($want) in $(secs $(($(now_ms) - start)))s"
            return 0
        fi
        (($(now_ms) < deadline)) || fail "$label: no convergence after ${limit_s}s; want $want; saw$line"
        sleep 0.2
    done
}

# batch NODE PREFIX COUNT: records COUNT new ids on NODE through /v1/usage/batch.
batch() {
    local n=$1 prefix=$2 count=$3 i body code applied
    body='{"records":['
    for ((i = 1; i <= count; i++)); do
        ((i == 1)) || body+=','
        body+="{\"id\":\"$prefix-$i\",\"attributes\":{\"app\":\"e2e\"}}"
    done
    body+=']}'
    code=$(req POST "$n" /v1/usage/batch client "$TMP/batch.$n" "$body")
    [[ "$code" == 200 ]] || fail "batch $prefix on $n: HTTP $code $(cat "$TMP/batch.$n" 2>/dev/null)"
    applied=$(json applied "$TMP/batch.$n")
    [[ "$applied" == "$count" ]] || fail "batch $prefix on $n: $applied of $count applied"
    EXP[$n]=$((${EXP[$n]:-0} + count))
}

# A write of SIZE records keyed KEY: /v1/usage for one record (id KEY), else
# /v1/usage/batch (ids KEY.1 .. KEY.SIZE). write_ids prints the ids, write_send POSTs it
# to NODE and prints the status (the reply in OUT).
write_ids() {
    local key=$1 size=$2 j
    if ((size == 1)); then echo "$key"; else for ((j = 1; j <= size; j++)); do echo "$key.$j"; done; fi
}
write_send() {
    local n=$1 key=$2 size=$3 out=$4 body id sep=""
    if ((size == 1)); then
        req POST "$n" /v1/usage client "$out" "{\"id\":\"$key\",\"attributes\":{\"app\":\"e2e\"}}"
    else
        body='{"records":['
        for id in $(write_ids "$key" "$size"); do
            body+="$sep{\"id\":\"$id\",\"attributes\":{\"app\":\"e2e\"}}"
            sep=,
        done
        req POST "$n" /v1/usage/batch client "$out" "$body]}"
    fi
}

# writer NODE NAME SIZE: writes of SIZE records to NODE until $TMP/stop exists; the ids of
# writes answered 200 go to acked.NODE, the writes without a reply or with an error to
# unknown.NODE ("KEY SIZE STATUS").
writer() {
    trap - EXIT TERM INT
    local n=$1 name=$2 size=$3 i=0 key code
    while [[ ! -e "$TMP/stop" ]] && ((i < 20000)); do
        i=$((i + 1))
        key="$name-$n-$i"
        code=$(write_send "$n" "$key" "$size" "$TMP/w.$n.$name")
        if [[ "$code" == 200 ]]; then
            write_ids "$key" "$size" >>"$TMP/acked.$n"
        else
            echo "$key $size $code" >>"$TMP/unknown.$n"
            sleep 0.05
        fi
    done
}

# ============================================================================================
step "build image $IMAGE offline"
if [[ "${TALLY_E2E_SKIP_BUILD:-0}" == 1 ]]; then
    docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "TALLY_E2E_SKIP_BUILD=1 but no image $IMAGE"
    log "skipped (TALLY_E2E_SKIP_BUILD=1)"
else
    TALLY_NO_ENV_FILE=1 "$HERE/build-offline.sh" "$IMAGE" || fail "build-offline.sh failed"
fi

step "start the fleet"
# A subnet 10.77.X.0/24 that overlaps no Docker network, and free loopback ports.
existing="$(docker network inspect $(docker network ls -q) \
    --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null | tr '\n' ' ')"
read -r PREFIX P1 P2 P3 P4 < <(python3 - "$existing" <<'EOF'
import ipaddress, random, socket, sys
used = [ipaddress.ip_network(s, strict=False) for s in sys.argv[1].split() if ":" not in s]
cands = list(range(100, 255)); random.shuffle(cands)
prefix = next(f"10.77.{x}" for x in cands
              if not any(ipaddress.ip_network(f"10.77.{x}.0/24").overlaps(u) for u in used))
socks = []
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(prefix, *[s.getsockname()[1] for s in socks])
EOF
)
PORT[tally-1]=$P1 PORT[tally-2]=$P2 PORT[tally-3]=$P3 PORT[tally-4]=$P4
IP[tally-1]=$PREFIX.11 IP[tally-2]=$PREFIX.12 IP[tally-3]=$PREFIX.13 IP[tally-4]=$PREFIX.14
secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
# Exported too: compose lets the shell's environment win over the env file.
export TALLY_IMAGE="$IMAGE" TALLY_SUBNET_PREFIX="$PREFIX"
export TALLY_HTTP_PORT_1=$P1 TALLY_HTTP_PORT_2=$P2 TALLY_HTTP_PORT_3=$P3 TALLY_HTTP_PORT_4=$P4
export TALLY_CLUSTER_KEY TALLY_ADMIN_TOKEN TALLY_CLIENT_TOKEN
TALLY_CLUSTER_KEY=$(secret) TALLY_ADMIN_TOKEN=$(secret) TALLY_CLIENT_TOKEN=$(secret)
(
    umask 077
    env | grep -E '^TALLY_(IMAGE|SUBNET_PREFIX|HTTP_PORT_[0-9]|CLUSTER_KEY|ADMIN_TOKEN|CLIENT_TOKEN)=' >"$TMP/env"
    echo "Authorization: Bearer $TALLY_ADMIN_TOKEN" >"$TMP/admin.header"
    echo "Authorization: Bearer $TALLY_CLIENT_TOKEN" >"$TMP/client.header"
)
log "project $PROJECT, subnet $PREFIX.0/24, ports $P1 $P2 $P3 (tally-4: $P4), ${COMPOSE[*]}"
STARTED_FLEET=1
compose up -d || fail "compose up failed"
for n in tally-1 tally-2 tally-3; do
    CID[$n]=$(compose ps -q "$n")
    [[ -n "${CID[$n]}" ]] || fail "no container for $n"
done
NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "${CID[tally-1]}")
for n in tally-1 tally-2 tally-3; do wait_ready "$n" 90; done

step "limit visible on all nodes, usage counted exactly"
code=$(req PUT tally-1 "/v1/limits/$LIMIT" admin "$TMP/put" \
    '{"scope":{"app":"e2e"},"metric":"requests","max":1000000000000,"period":"never"}')
[[ "$code" == 200 ]] || fail "PUT limit: HTTP $code $(cat "$TMP/put")"
start=$(now_ms)
for n in tally-1 tally-2 tally-3; do
    deadline=$(($(now_ms) + 30000))
    until [[ "$(req GET "$n" "/v1/limits/$LIMIT" client "$TMP/get.$n")" == 200 ]]; do
        (($(now_ms) < deadline)) || fail "limit not visible on $n after 30 s"
        sleep 0.1
    done
done
note "limit written on tally-1 visible on all three in $(secs $(($(now_ms) - start)))s"
for n in tally-1 tally-2 tally-3; do batch "$n" "init-$n" 200; done
wait_converged "initial usage" 60 tally-1 tally-2 tally-3

step "(1) partition tally-3, write on both sides, heal"
docker network disconnect "$NET" "${CID[tally-3]}" || fail "network disconnect failed"
part_start=$(now_ms)
log "tally-3 disconnected from $NET"
detected=""
round=0
while :; do
    round=$((round + 1))
    batch tally-1 "part-tally-1-$round" 20
    batch tally-2 "part-tally-2-$round" 20
    for k in 1 2; do
        id="part-tally-3-$round-$k"
        docker exec -e TALLY_TOKEN="$TALLY_CLIENT_TOKEN" "${CID[tally-3]}" tally usage --id "$id" --attr app=e2e --json \
            >"$TMP/exec.out" 2>&1 || fail "usage $id on partitioned tally-3: $(cat "$TMP/exec.out")"
        EXP[tally-3]=$((${EXP[tally-3]:-0} + 1))
    done
    if [[ -z "$detected" && "$(req GET tally-1 /v1/cluster client "$TMP/cluster")" == 200 &&
        "$(json live "$TMP/cluster" tally-3)" == false ]]; then
        detected=$(now_ms)
        note "partition: tally-1 saw tally-3 not live after $(secs $((detected - part_start)))s"
    fi
    # Keep writing until tally-3 is seen dead (so relays get exercised), and 2 s more.
    if [[ -n "$detected" && $round -ge 3 && $(now_ms) -gt $((detected + 2000)) ]]; then break; fi
    if (($(now_ms) - part_start > 45000)); then
        note "partition: tally-1 still saw tally-3 live after 45 s (healing anyway)"
        break
    fi
    sleep 0.5
done
docker exec -e TALLY_TOKEN="$TALLY_CLIENT_TOKEN" "${CID[tally-3]}" tally limits get "$LIMIT" --json >"$TMP/view.part3" 2>&1 ||
    fail "reading tally-3 during the partition: $(cat "$TMP/view.part3")"
log "during the partition tally-3 sees $(json sig "$TMP/view.part3"), the fleet $(expected_sig) after $round rounds"
docker network connect --ip "${IP[tally-3]}" "$NET" "${CID[tally-3]}" || fail "network connect failed"
heal_start=$(now_ms)
log "tally-3 reconnected after $(secs $((heal_start - part_start)))s of partition"
wait_converged "partition healed" 90 tally-1 tally-2 tally-3
if [[ -n "$detected" ]]; then
    deadline=$(($(now_ms) + 60000))
    until [[ "$(req GET tally-1 /v1/cluster client "$TMP/cluster")" == 200 &&
        "$(json live "$TMP/cluster" tally-3)" == true ]]; do
        (($(now_ms) < deadline)) || fail "tally-1 does not see tally-3 live 60 s after the heal"
        sleep 0.2
    done
    note "partition: tally-1 saw tally-3 live again $(secs $(($(now_ms) - heal_start)))s after the heal"
fi

step "(1b) hard limit: partition tally-3, spend on both sides until denied, heal"
HARD=e2e-hard
code=$(req PUT tally-1 "/v1/limits/$HARD" admin "$TMP/hput" \
    '{"scope":{"app":"hard"},"metric":"tokens","max":3000,"period":"never","mode":"hard"}')
[[ "$code" == 200 ]] || fail "PUT hard limit: HTTP $code $(cat "$TMP/hput")"
members=$(python3 -c 'import json,sys; print(",".join(m["node"] for m in json.load(open(sys.argv[1]))["members"]))' "$TMP/hput")
[[ "$members" == "tally-1,tally-2,tally-3" ]] || fail "hard limit members: want the live fleet tally-1,tally-2,tally-3, got $members"
for n in tally-1 tally-2 tally-3; do
    deadline=$(($(now_ms) + 30000))
    until [[ "$(req GET "$n" "/v1/limits/$HARD" client "$TMP/hget.$n")" == 200 ]]; do
        (($(now_ms) < deadline)) || fail "hard limit not visible on $n after 30 s"
        sleep 0.1
    done
done
docker network disconnect "$NET" "${CID[tally-3]}" || fail "network disconnect failed"
hard_start=$(now_ms)
log "tally-3 disconnected; spending 100 tokens at a time on tally-1 (majority side) and tally-3 until denied"
python3 "$HERE/hard_spend.py" http "http://127.0.0.1:${PORT[tally-1]}" "$TALLY_CLIENT_TOKEN" hard-1 100 40 \
    >"$TMP/hard.1" 2>"$TMP/hard.1.err" &
spend1=$!
python3 "$HERE/hard_spend.py" exec "${CID[tally-3]}" "$TALLY_CLIENT_TOKEN" hard-3 100 5 \
    >"$TMP/hard.3" 2>"$TMP/hard.3.err" || fail "spending on tally-3: $(cat "$TMP/hard.3.err")"
wait "$spend1" || fail "spending on tally-1: $(cat "$TMP/hard.1.err")"
acked1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acked"])' "$TMP/hard.1")
acked3=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acked"])' "$TMP/hard.3")
over=$(python3 -c 'import json,sys; print(sum(json.load(open(f))["overrun"] for f in sys.argv[1:]))' "$TMP/hard.1" "$TMP/hard.3")
note "hard limit under partition: tally-1 side acknowledged $acked1 ($(cat "$TMP/hard.1")), tally-3 side $acked3 ($(cat "$TMP/hard.3")) in $(secs $(($(now_ms) - hard_start)))s"
((over == 0)) || fail "hard limit: $over tokens reported as overrun by reserved spending"
total=$((acked1 + acked3))
((total <= 3000)) || fail "hard limit overspent under partition: $total > 3000 acknowledged"
((total * 10 >= 3000 * 8)) || fail "hard limit under-used: $total acknowledged < 80% of 3000"
docker network connect --ip "${IP[tally-3]}" "$NET" "${CID[tally-3]}" || fail "network connect failed"
deadline=$(($(now_ms) + 90000))
while :; do
    ok=1 line=""
    for n in tally-1 tally-2 tally-3; do
        code=$(req GET "$n" "/v1/limits/$HARD" client "$TMP/hview.$n")
        used=$([[ "$code" == 200 ]] && json field "$TMP/hview.$n" used || echo "http_$code")
        line+=" $n:$used"
        [[ "$used" == "$total" ]] || ok=0
    done
    ((ok)) && break
    (($(now_ms) < deadline)) || fail "hard limit: no convergence to $total 90 s after the heal; saw$line"
    sleep 0.2
done
note "hard limit: healed; every node counts $total of 3000 (<= max, >= 80%)"

step "(2) SIGKILL tally-2 under writes, restart"
rm -f "$TMP/stop"
for n in tally-1 tally-2 tally-3; do
    : >"$TMP/acked.$n"
    : >"$TMP/unknown.$n"
    writer "$n" kill 1 &
    WRITER_PIDS+=($!)
done
# Batches of 50 keep a commit in flight on tally-2 more often when it is killed.
writer tally-2 killbatch 50 &
WRITER_PIDS+=($!)
sleep 2
docker kill -s KILL "${CID[tally-2]}" >/dev/null || fail "docker kill failed"
log "tally-2 killed (SIGKILL) with $(wc -l <"$TMP/acked.tally-2") records acknowledged by it so far"
sleep 2
docker start "${CID[tally-2]}" >/dev/null || fail "docker start failed"
log "tally-2 started again"
wait_ready tally-2 90
sleep 1
touch "$TMP/stop"
for p in "${WRITER_PIDS[@]}"; do wait "$p" || true; done
WRITER_PIDS=()
for n in tally-1 tally-2 tally-3; do
    log "writers: $n acknowledged $(wc -l <"$TMP/acked.$n") records, $(wc -l <"$TMP/unknown.$n") writes of unknown outcome"
done
[[ -s "$TMP/unknown.tally-2" ]] || log "note: no write to tally-2 was in flight or refused during the kill"
# Each write of unknown outcome again, to the same node, until it answers 200.
retried=0
was_durable=0
for n in tally-1 tally-2 tally-3; do
    while read -r key size _; do
        deadline=$(($(now_ms) + 60000))
        until [[ "$(write_send "$n" "$key" "$size" "$TMP/retry")" == 200 ]]; do
            (($(now_ms) < deadline)) || fail "retrying $key on $n: no 200 within 60 s"
            sleep 0.2
        done
        retried=$((retried + size))
        if ((size == 1)); then
            applied=0
            [[ "$(json field "$TMP/retry" applied)" == true ]] && applied=1
        else
            applied=$(json applied "$TMP/retry")
        fi
        was_durable=$((was_durable + size - applied))
        write_ids "$key" "$size" >>"$TMP/acked.$n"
    done <"$TMP/unknown.$n"
done
log "retried $retried records of unknown outcome on their node: $was_durable had been applied before the kill (dedup), $((retried - was_durable)) were new"
for n in tally-1 tally-2 tally-3; do
    distinct=$(sort -u "$TMP/acked.$n" | wc -l)
    EXP[$n]=$((${EXP[$n]:-0} + distinct))
done
wait_converged "after the crash" 90 tally-1 tally-2 tally-3

step "(3) replace tally-3 by a new node tally-4"
vol3=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "${CID[tally-3]}")
repl_start=$(now_ms)
compose stop -t 10 tally-3 >/dev/null 2>&1 || fail "compose stop tally-3 failed"
compose rm -f tally-3 >/dev/null 2>&1 || fail "compose rm tally-3 failed"
docker volume rm "$vol3" >/dev/null || fail "removing volume $vol3 failed"
log "tally-3 stopped and removed with its volume $vol3"
compose --profile replace up -d --no-deps tally-4 || fail "compose up tally-4 failed"
CID[tally-4]=$(compose --profile replace ps -q tally-4)
[[ -n "${CID[tally-4]}" ]] || fail "no container for tally-4"
wait_ready tally-4 90
wait_converged "new node tally-4 (with tally-3's usage)" 120 tally-1 tally-2 tally-4
note "replacement: tally-3 stopped -> tally-4 exact in $(secs $(($(now_ms) - repl_start)))s"
batch tally-4 "new-tally-4" 50
wait_converged "writes on tally-4" 60 tally-1 tally-2 tally-4

step "Docker health checks"
for n in tally-1 tally-2; do
    deadline=$(($(now_ms) + 60000))
    until [[ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "${CID[$n]}")" == healthy ]]; do
        (($(now_ms) < deadline)) || fail "$n: health status not healthy after 60 s: $(docker inspect -f '{{json .State.Health}}' "${CID[$n]}")"
        sleep 1
    done
    log "$n: healthy"
done
summary 0
