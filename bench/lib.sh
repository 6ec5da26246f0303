# Shell helpers shared by bench/smtp.sh and bench/mta.sh (sourced, not run).
# The sourcing script defines: LOG_TAG, POSTFIX, SMTP_SINK, BASE_PORT, NEXT_PORT, PIDS (array),
# PF_LIVE and TMP; CPU_SERVER is optional (taskset CPU list for the sink).

BENCH_LIB_HELPER="$ROOT/bench/smtp_report.py" # cpu / tree / fsync helpers

log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%H:%M:%S)" "$*" >&2; }

pf_master_pid() { # pf_master_pid DIR -> pid of the instance's master, if alive
    local pid
    pid=$(tr -d ' \n' <"$1/queue/pid/master.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

pf_master_cf() { # pf_master_cf DIR PORT [EXTRA_LINES]: a private instance's master.cf, smtpd on PORT
    cat >"$1/etc/master.cf" <<EOF
127.0.0.1:$2 inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    if [[ -n "${3:-}" ]]; then printf '%s\n' "$3" >>"$1/etc/master.cf"; fi
}

pf_stop() { # pf_stop DIR: postfix stop, wait <=10 s for master to go, then SIGKILL its tree
    local dir=$1 pid i
    pid=$(pf_master_pid "$dir") || pid=""
    timeout 20 "$POSTFIX" -c "$dir/etc" stop >>"$dir/postfix-cmd.log" 2>&1
    if [[ -n $pid ]]; then
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "postfix master $pid still alive after stop; killing its process tree"
            local p
            for p in $(python3 "$BENCH_LIB_HELPER" tree "$pid"); do kill -KILL "$p" 2>/dev/null; done
        fi
    fi
}

cleanup() {
    local p
    [[ -n $PF_LIVE ]] && pf_stop "$PF_LIVE"
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

pin() { # pin CPULIST cmd... -> exec cmd, under taskset if CPULIST is set
    local cpus=$1
    shift
    if [[ -n $cpus ]]; then
        exec taskset -c "$cpus" "$@"
    else
        exec "$@"
    fi
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p != "$1" ]] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_pid() { # SIGTERM, wait up to 3 s, then SIGKILL
    local pid=$1 i
    if kill -TERM "$pid" 2>/dev/null; then
        for ((i = 0; i < 30; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    forget_pid "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # wait_port PORT PID SECONDS: until PORT accepts while PID lives
    local port=$1 pid=$2 n=$(($3 * 20)) i
    for ((i = 0; i < n; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        port_open "$port" && return 0
        sleep 0.05
    done
    return 1
}

sink_count() { # sink_count FILE -> last "mesg=N" of an smtp-sink -c output (0 if none)
    local n
    n=$(tail -c 300 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1)
    echo "${n#mesg=}" | sed 's/^$/0/'
}

source_count() { # source_count FILE -> last running counter of smtp-source -c
    local n
    n=$(tail -c 300 "$1" 2>/dev/null | tr '\r' '\n' | grep -E '^[0-9]+$' | tail -n 1)
    echo "${n:-0}"
}

now() { echo "$EPOCHREALTIME"; }

next_port() { # -> PORT: next free port in BASE_PORT+101..+900 (rotating, avoids TIME_WAIT leftovers)
    local i
    for ((i = 0; i < 800; i++)); do
        NEXT_PORT=$((NEXT_PORT + 1))
        ((NEXT_PORT > BASE_PORT + 900)) && NEXT_PORT=$((BASE_PORT + 101))
        port_open "$NEXT_PORT" || { PORT=$NEXT_PORT; return 0; }
    done
    log "no free port in $((BASE_PORT + 101))..$((BASE_PORT + 900))"
    exit 1
}

start_sink() { # start_sink PORT OUTFILE -> SINK_PID; smtp-sink with counters, no durability
    local port=$1 outf=$2
    (pin "${CPU_SERVER:-}" "$SMTP_SINK" -c -u postfix "127.0.0.1:$port" 256) >"$outf" 2>&1 &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    if ! wait_port "$port" "$SINK_PID" "$START_TIMEOUT"; then
        FAIL_REASON="smtp-sink did not listen on $port: $(tr '\r' '\n' <"$outf" | tail -n 1 | cut -c1-120)"
        stop_pid "$SINK_PID"
        SINK_PID=""
        return 1
    fi
}
