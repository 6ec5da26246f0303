#!/usr/bin/env bash
# Side-by-side loopback benchmark of TCP load balancers:
#   direct (client -> server), HAProxy (mode tcp), ringmail lb (uring/epoll,
#   buffered/splice relay).
#
# Every run starts a fresh proxy process. Within each repeat round the proxies
# are interleaved (and their order rotated) so machine noise spreads evenly.
# Results: bench/out/lb-<date>.md (table), bench/out/lb-<date>.json (all raw
# results) and bench/out/lb-<date>/ (per-run JSON and logs).
#
# Environment (defaults in brackets):
#   RINGMAIL     ringmail binary              [target/release/ringmail]
#   BENCH        ringmail-bench binary        [target/release/ringmail-bench]
#   REPEATS      rounds per test/proxy        [3]
#   DURATION     duration of timed tests      [5s]
#   TESTS        subset of: bulk1 bulk8 bulkdown connrate rr idle  [all]
#   PROXIES      subset of: direct haproxy haproxy-splice rm-uring rm-epoll
#                rm-uring-splice rm-epoll-splice                   [all]
#                (splice variants skip the idle test: 6 descriptors per
#                connection do not fit 9,000 connections in 20,000 files)
#   WORKERS      ringmail --workers           [2]
#   CONCURRENCY  connrate in-flight conns     [32]
#   SOURCE_IPS   connrate client source addresses (127.0.0.2…) [64]
#   RR_CONNS     rr kept-alive connections    [32]
#   CLIENT_THREADS  load generator threads    [2]
#   IDLE_CONNS   idle test connections        [9000]
#   IDLE_SETTLE  idle settle time             [2s]
#   CPU_CLIENT / CPU_PROXY / CPU_SERVER  optional taskset CPU lists, e.g. 0 / 1 / 1
#   BASE_PORT    first port used              [21000]
#   OUT          output directory             [bench/out]
#   FAMILY       4 or 6                       [4]
#                6 (root only): the whole run happens in a network namespace of its
#                own, deleted at the end, whose `lo` holds fd72:6d::1 (every listener
#                and backend) and a local route for fd72:6d::/64 (the connrate client's
#                source addresses fd72:6d::2 and up, like 127.0.0.2 and up for IPv4),
#                and tcp_tw_reuse = 1 there: the default (2) lets only 127/8 and ::1 reuse
#                TIME_WAIT ports, and the proxies' backend connections come from one address

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

RINGMAIL=${RINGMAIL:-target/release/ringmail}
BENCH=${BENCH:-target/release/ringmail-bench}
REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5s}
TESTS=${TESTS:-"bulk1 bulk8 bulkdown connrate rr idle"}
PROXIES=${PROXIES:-"direct haproxy haproxy-splice rm-uring rm-epoll rm-uring-splice rm-epoll-splice"}
WORKERS=${WORKERS:-2}
CONCURRENCY=${CONCURRENCY:-32}
SOURCE_IPS=${SOURCE_IPS:-64}
RR_CONNS=${RR_CONNS:-32}
CLIENT_THREADS=${CLIENT_THREADS:-2}
IDLE_CONNS=${IDLE_CONNS:-9000}
IDLE_SETTLE=${IDLE_SETTLE:-2s}
CPU_CLIENT=${CPU_CLIENT:-}
CPU_PROXY=${CPU_PROXY:-}
CPU_SERVER=${CPU_SERVER:-}
BASE_PORT=${BASE_PORT:-21000}
OUT=${OUT:-bench/out}
FAMILY=${FAMILY:-4}

case $FAMILY in
    4) ADDR=127.0.0.1 ;;
    6)
        ADDR=fd72:6d::1
        if [[ -z ${LB_BENCH_NETNS:-} ]]; then
            # Re-run this script inside a namespace of its own: IPv6 loopback has one
            # address (::1), and the connection-rate test needs many source addresses.
            [[ $(id -u) == 0 ]] || { echo "FAMILY=6 needs root (it creates a network namespace)" >&2; exit 1; }
            NS="rmlb6-$$"
            ip netns add "$NS" || exit 1
            trap 'ip netns delete "$NS" 2>/dev/null' EXIT
            ip -n "$NS" link set lo up &&
                ip -n "$NS" -6 addr add "$ADDR/128" dev lo nodad &&
                ip -n "$NS" -6 route add local fd72:6d::/64 dev lo &&
                ip netns exec "$NS" sysctl -qw net.ipv6.ip_nonlocal_bind=1 net.ipv4.tcp_tw_reuse=1 || exit 1
            LB_BENCH_NETNS=$NS ip netns exec "$NS" bash "$ROOT/bench/lb.sh"
            exit $?
        fi
        ;;
    *)
        echo "FAMILY must be 4 or 6" >&2
        exit 1
        ;;
esac
# ADDR with a port: HOST:PORT for IPv4, [HOST]:PORT for IPv6.
hostport() { if [[ $ADDR == *:* ]]; then echo "[$ADDR]:$1"; else echo "$ADDR:$1"; fi; }

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR="$OUT/lb-$STAMP"
MD="$OUT/lb-$STAMP.md"
JSON="$OUT/lb-$STAMP.json"
TMP=$(mktemp -d -t ringmail-lb.XXXXXX)
mkdir -p "$RUN_DIR"

log() { printf '[lb.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- cleanup
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    sleep 0.2
    for p in "${PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

pin() { # pin CPULIST cmd... -> run cmd, under taskset if CPULIST is set
    local cpus=$1
    shift
    if [[ -n $cpus ]]; then
        exec taskset -c "$cpus" "$@"
    else
        exec "$@"
    fi
}

stop_pid() { # SIGTERM, wait up to 3 s, then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    forget_pid "$pid"
}

forget_pid() { # drop a reaped pid from the cleanup list
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p != "$1" ]] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

wait_port() { # wait_port PORT PID: until PORT accepts (<=5 s) and PID lives
    local port=$1 pid=$2 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/$ADDR/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# ---------------------------------------------------------------- preflight
[[ -x $BENCH ]] || { log "BENCH=$BENCH not found; run: cargo build --release -p ringmail-bench"; exit 1; }
command -v python3 >/dev/null || { log "python3 is required"; exit 1; }
HAVE_HAPROXY=1
command -v haproxy >/dev/null || { HAVE_HAPROXY=0; log "haproxy not found: its cells will be n/a"; }
HAVE_RINGMAIL=1
[[ -x $RINGMAIL ]] || { HAVE_RINGMAIL=0; log "RINGMAIL=$RINGMAIL not found: ringmail cells will be n/a"; }

NOFILE=$(ulimit -n)
# HAProxy needs ~2 fds per connection; asking for more than the fd limit
# allows makes it refuse to start, so cap maxconn at what fits.
HAPROXY_MAXCONN=30000
if [[ $NOFILE != unlimited ]] && ((HAPROXY_MAXCONN * 2 + 100 > NOFILE)); then
    HAPROXY_MAXCONN=$(((NOFILE - 100) / 2))
fi
if [[ $NOFILE != unlimited ]] && ((IDLE_CONNS * 2 + 50 > NOFILE)); then
    log "warning: IDLE_CONNS=$IDLE_CONNS needs ~$((IDLE_CONNS * 2)) fds in the proxy; limit is $NOFILE"
fi

# Hard bound for one client run: the test duration plus generous slack for
# connection setup, draining and (idle) opening 9,000 connections.
CLIENT_TIMEOUT=$(awk -v d="$DURATION" 'BEGIN {
    m = 1
    if (d ~ /ms$/) { m = 0.001; sub(/ms$/, "", d) }
    else if (d ~ /h$/) { m = 3600; sub(/h$/, "", d) }
    else if (d ~ /m$/) { m = 60; sub(/m$/, "", d) }
    else if (d ~ /s$/) { sub(/s$/, "", d) }
    printf "%d", d * m + 180
}')

# ---------------------------------------------------------------- servers
SINK_PORT=$((BASE_PORT + 1))
SOURCE_PORT=$((BASE_PORT + 2))
ECHO_PORT=$((BASE_PORT + 3))
RR_PORT=$((BASE_PORT + 4))
RR_SIZE=64

start_server() { # start_server MODE PORT
    local mode=$1 port=$2
    (pin "$CPU_SERVER" "$BENCH" server --listen "$(hostport "$port")" --mode "$mode" \
        --req-size "$RR_SIZE" --resp-size "$RR_SIZE" --max-time 6h) \
        >"$RUN_DIR/server-$mode.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port" "$pid" || { log "server $mode failed to start (see $RUN_DIR/server-$mode.log)"; exit 1; }
}
start_server sink "$SINK_PORT"
start_server source "$SOURCE_PORT"
start_server echo "$ECHO_PORT"
start_server rr "$RR_PORT"

# ---------------------------------------------------------------- proxies
NEXT_PORT=$((BASE_PORT + 100))
PROXY_PID=""
PROXY_PORT=""

next_port() {
    NEXT_PORT=$((NEXT_PORT + 1))
    ((NEXT_PORT > BASE_PORT + 900)) && NEXT_PORT=$((BASE_PORT + 101))
    PROXY_PORT=$NEXT_PORT
}

start_proxy() { # start_proxy NAME BACKEND_PORT LOGFILE -> sets PROXY_PID/PROXY_PORT
    local name=$1 bport=$2 logf=$3
    PROXY_PID=""
    next_port
    case $name in
        haproxy | haproxy-splice)
            ((HAVE_HAPROXY)) || { FAIL_REASON="haproxy not installed"; return 1; }
            local cfg="$TMP/haproxy-$PROXY_PORT.cfg" splice="" pipes="" maxconn=$HAPROXY_MAXCONN
            if [[ $name == haproxy-splice ]]; then
                # Pipes cost 2 fds each; keep them within the fd limit too.
                splice="    option splice-auto"
                pipes="    maxpipes 512"
                maxconn=$((HAPROXY_MAXCONN - 512))
            fi
            cat >"$cfg" <<EOF
global
    nbthread 2
    maxconn $maxconn
$pipes
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
$splice
frontend fe
    bind ipv$FAMILY@$ADDR:$PROXY_PORT
    maxconn $maxconn
    default_backend be
backend be
    server s1 ipv$FAMILY@$ADDR:$bport maxconn $maxconn
EOF
            (pin "$CPU_PROXY" haproxy -f "$cfg" -db) >"$logf" 2>&1 &
            ;;
        rm-uring | rm-epoll | rm-uring-splice | rm-epoll-splice)
            ((HAVE_RINGMAIL)) || { FAIL_REASON="RINGMAIL binary not found"; return 1; }
            local engine=${name#rm-}
            engine=${engine%-splice}
            local relay=buffered
            [[ $name == *-splice ]] && relay=splice
            (pin "$CPU_PROXY" "$RINGMAIL" lb --listen "$(hostport "$PROXY_PORT")" \
                --backend "$(hostport "$bport")" --engine "$engine" --relay "$relay" \
                --workers "$WORKERS") >"$logf" 2>&1 &
            ;;
        *)
            log "unknown proxy $name"
            return 1
            ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    if ! wait_port "$PROXY_PORT" "$PROXY_PID"; then
        log "$name failed to start or listen on $PROXY_PORT (see $logf)"
        FAIL_REASON="did not start/listen: $(tail -n 1 "$logf" 2>/dev/null | cut -c1-120)"
        stop_pid "$PROXY_PID"
        PROXY_PID=""
        return 1
    fi
    return 0
}

# ---------------------------------------------------------------- tests
backend_port() {
    case $1 in
        bulk1 | bulk8) echo "$SINK_PORT" ;;
        bulkdown) echo "$SOURCE_PORT" ;;
        connrate | idle) echo "$ECHO_PORT" ;;
        rr) echo "$RR_PORT" ;;
    esac
}

applies() { # applies TEST PROXY: splice variants cannot hold the idle test (6 fds per connection)
    [[ $2 == *splice ]] && [[ $1 == idle ]] && return 1
    return 0
}

run_one() { # run_one TEST PROXY ROUND
    local test=$1 proxy=$2 round=$3
    local base="$RUN_DIR/$test--$proxy--r$round"
    local bport target pidarg=()
    bport=$(backend_port "$test")
    if [[ $proxy == direct ]]; then
        target=$(hostport "$bport")
    else
        FAIL_REASON="failed to start"
        if ! start_proxy "$proxy" "$bport" "$base.proxy.log"; then
            echo "$FAIL_REASON" >"$base.fail"
            return
        fi
        target=$(hostport "$PROXY_PORT")
        pidarg=(--pid "$PROXY_PID")
    fi
    local args=(--target "$target" --label "$proxy" --json "$base.json" "${pidarg[@]}")
    local cmd
    case $test in
        bulk1) cmd=(tcp bulk --streams 1 --duration "$DURATION") ;;
        bulk8) cmd=(tcp bulk --streams 8 --duration "$DURATION") ;;
        bulkdown) cmd=(tcp bulk --streams 1 --direction down --duration "$DURATION") ;;
        connrate) cmd=(tcp connrate --concurrency "$CONCURRENCY" --threads "$CLIENT_THREADS" --source-ips "$SOURCE_IPS" --duration "$DURATION") ;;
        rr) cmd=(tcp rr --connections "$RR_CONNS" --threads "$CLIENT_THREADS" --req-size "$RR_SIZE" --resp-size "$RR_SIZE" --duration "$DURATION") ;;
        idle) cmd=(tcp idle --connections "$IDLE_CONNS" --settle "$IDLE_SETTLE") ;;
    esac
    log "round $round: $test via $proxy -> $target"
    local rc=0 cpid
    # Run in the background and `wait`, so an INT/TERM trap fires at once
    # (and cleanup also stops the client) instead of after the run.
    (pin "$CPU_CLIENT" timeout "$CLIENT_TIMEOUT" "$BENCH" "${cmd[@]}" "${args[@]}") 2>"$base.client.log" &
    cpid=$!
    PIDS+=("$cpid")
    wait "$cpid" || rc=$?
    forget_pid "$cpid"
    if ((rc != 0)); then
        echo "client failed (exit $rc): $(tail -n 1 "$base.client.log" | cut -c1-120)" >"$base.fail"
        rm -f "$base.json"
        log "  $test via $proxy failed: $(tail -n 1 "$base.client.log")"
    fi
    if [[ -n $PROXY_PID && $proxy != direct ]]; then
        # A proxy that died during the run makes the result invalid.
        if ! kill -0 "$PROXY_PID" 2>/dev/null; then
            echo "proxy exited during the run" >"$base.fail"
            rm -f "$base.json"
            log "  $proxy exited during $test"
        fi
        stop_pid "$PROXY_PID"
        PROXY_PID=""
    fi
}

read -r -a TEST_LIST <<<"$TESTS"
read -r -a PROXY_LIST <<<"$PROXIES"
NP=${#PROXY_LIST[@]}
log "run dir $RUN_DIR; tests: ${TEST_LIST[*]}; proxies: ${PROXY_LIST[*]}; repeats $REPEATS; duration $DURATION"

for ((round = 1; round <= REPEATS; round++)); do
    for test in "${TEST_LIST[@]}"; do
        # Rotate the proxy order each round so no proxy always goes first.
        for ((k = 0; k < NP; k++)); do
            proxy=${PROXY_LIST[$(((k + round - 1) % NP))]}
            applies "$test" "$proxy" || continue
            run_one "$test" "$proxy" "$round"
        done
    done
done

# ---------------------------------------------------------------- report
META="family=ipv$FAMILY repeats=$REPEATS duration=$DURATION workers=$WORKERS concurrency=$CONCURRENCY source_ips=$SOURCE_IPS rr_conns=$RR_CONNS client_threads=$CLIENT_THREADS idle_conns=$IDLE_CONNS haproxy_maxconn=$HAPROXY_MAXCONN nproc=$(nproc) cpu_client=${CPU_CLIENT:-any} cpu_proxy=${CPU_PROXY:-any} cpu_server=${CPU_SERVER:-any} haproxy=$( ((HAVE_HAPROXY)) && haproxy -v 2>/dev/null | head -n 1 | awk '{print $3}')"
python3 "$ROOT/bench/lb_report.py" --run-dir "$RUN_DIR" --md "$MD" --json "$JSON" \
    --tests "${TEST_LIST[*]}" --proxies "${PROXY_LIST[*]}" --meta "$META" || exit 1
cat "$MD"
log "wrote $MD and $JSON"
