#!/usr/bin/env bash
# Side-by-side SMTP acceptance benchmark on loopback:
#   smtp-sink  (postfix package: accepts and discards, no queue, no fsync —
#               the protocol limit of the load generator + kernel),
#   postfix    (a private Postfix instance as a real MX: queue files fsynced
#               before 250, then relayed to a downstream smtp-sink),
#   ringmail   (`ringmail mx`, relaying to a downstream smtp-sink; thread-per-core runtimes).
#   ringmail-mt (the same with one tokio multi-thread runtime: the runtime comparison).
#   ringmail-pinned (the same with each per-core worker pinned to its CPU).
#
# Load: smtp-source (postfix package), SESSIONS concurrent sessions, MESSAGES
# messages of SIZE bytes, one recipient each, a new connection per message.
# Every run starts a fresh server (and a fresh downstream sink, and for
# Postfix a fresh instance in a new temp directory). Within each repeat round
# the contenders are interleaved and their order rotated.
#
# Per run: wall time of smtp-source -> msgs/s; CPU of the contender's
# process tree (utime+stime+cutime+cstime from /proc, so children that exit
# and are reaped during the run still count) from just before smtp-source
# starts until the downstream sink has received every accepted message ->
# CPU ms per message; accepted (smtp-source's counter) and delivered (the
# downstream smtp-sink's message counter) counts.
#
# Results: bench/out/smtp-<date>.md (table, also printed), bench/out/smtp-<date>.json
# (summary plus every raw run) and bench/out/smtp-<date>/ (per-run JSON and logs).
#
# Environment (defaults in brackets):
#   RINGMAIL       ringmail binary                       [target/release/ringmail]
#   REPEATS        rounds per contender                  [3]
#   MESSAGES       messages per run (smtp-source -m)     [20000]
#   SESSIONS       concurrent sessions (smtp-source -s)  [20]
#   SIZE           message length in bytes (-l)          [2048]
#   CONTENDERS     subset of: smtp-sink postfix ringmail ringmail-mt ringmail-pinned
#                  [all]
#   SOURCE_OPTS    extra smtp-source flags, e.g. "-d" (keep the connection
#                  open for several messages)            []
#   PF_MAIN        extra main.cf lines for the Postfix instance, separated
#                  by ';', e.g. "in_flow_delay = 0s"     []
#   START_TIMEOUT  seconds a server gets to listen       [10]
#   RUN_TIMEOUT    hard bound for one smtp-source run, s [600]
#   DRAIN_TIMEOUT  seconds to wait for the downstream sink to receive all
#                  accepted messages after the run       [120]
#   CPU_CLIENT / CPU_SERVER  optional taskset CPU lists for smtp-source and
#                  for the contender (incl. its downstream sink)  []
#   BASE_PORT      ports used: BASE_PORT+101..+900       [22500]
#   OUT            output directory                      [bench/out]
#   TMPDIR         where spools / Postfix instances live (its filesystem's
#                  fsync latency is measured and reported) [/tmp]

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

RINGMAIL=${RINGMAIL:-target/release/ringmail}
REPEATS=${REPEATS:-3}
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-2048}
CONTENDERS=${CONTENDERS:-"smtp-sink postfix ringmail ringmail-mt ringmail-pinned"}
SOURCE_OPTS=${SOURCE_OPTS:-}
PF_MAIN=${PF_MAIN:-}
START_TIMEOUT=${START_TIMEOUT:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
CPU_CLIENT=${CPU_CLIENT:-}
CPU_SERVER=${CPU_SERVER:-}
BASE_PORT=${BASE_PORT:-22500}
OUT=${OUT:-bench/out}

SMTP_SINK=/usr/sbin/smtp-sink
SMTP_SOURCE=/usr/sbin/smtp-source
POSTFIX=/usr/sbin/postfix
REPORT="$ROOT/bench/smtp_report.py"

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR="$OUT/smtp-$STAMP"
MD="$OUT/smtp-$STAMP.md"
JSON="$OUT/smtp-$STAMP.json"
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
TMP=$(mktemp -d -t ringmail-smtp.XXXXXX) || exit 1
# Postfix daemons run as user postfix and must reach their queue directory.
chmod 755 "$TMP"

# ---------------------------------------------------------------- cleanup
LOG_TAG=smtp.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PIDS=()    # background processes we started (sinks, ringmail, smtp-source)
PF_LIVE="" # config dir of a running Postfix instance, if any

trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- preflight
for t in "$SMTP_SINK" "$SMTP_SOURCE" "$POSTFIX"; do
    [[ -x $t ]] || { log "$t not found; install postfix (apt-get install -y postfix, 'No configuration')"; exit 1; }
done
command -v python3 >/dev/null || { log "python3 is required"; exit 1; }
id postfix >/dev/null 2>&1 || { log "user postfix missing (postfix package not set up)"; exit 1; }
((EUID == 0)) || { log "must run as root (private Postfix instance, smtp-sink -u postfix)"; exit 1; }
HAVE_RINGMAIL=1
if [[ ! -x $RINGMAIL ]]; then
    HAVE_RINGMAIL=0
    log "RINGMAIL=$RINGMAIL not found: ringmail cells will be n/a (build: cargo build --release -p ringmail)"
fi

# ---------------------------------------------------------------- ports
NEXT_PORT=$((BASE_PORT + 100))

# ---------------------------------------------------------------- servers

pf_setup() { # pf_setup DIR PORT RELAYPORT: write a private Postfix instance
    local dir=$1 port=$2 rport=$3
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
    chmod 755 "$dir" "$dir/etc" "$dir/queue"
    chown postfix "$dir/data"
    cat >"$dir/etc/main.cf" <<EOF
# Private benchmark instance written by bench/smtp.sh (not the system Postfix).
compatibility_level = 3.6
config_directory = $dir/etc
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bench.test
mydomain = bench.test
myorigin = \$mydomain
# Nothing is delivered locally: bench.test is a relay domain whose next hop
# is the downstream smtp-sink.
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = bench.test
relayhost = [127.0.0.1]:$rport
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit
# No DNS anywhere.
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
maillog_file_prefixes = $dir
maillog_file = $dir/maillog
EOF
    if [[ -n $PF_MAIN ]]; then
        local line
        IFS=';' read -r -a extra <<<"$PF_MAIN"
        for line in "${extra[@]}"; do printf '%s\n' "$line" >>"$dir/etc/main.cf"; done
    fi
    # Debian's service list, with chroot off (the queue dir is a temp dir) and
    # smtpd on its own port; postlog writes maillog_file.
    pf_master_cf "$dir" "$port"
}

# start_server NAME PORT RELAYPORT BASE -> SERVER_PID (root of the contender's
# process tree); FAIL_REASON on failure
start_server() {
    local name=$1 port=$2 rport=$3 base=$4
    SERVER_PID=""
    case $name in
        smtp-sink)
            start_sink "$port" "$base.server.out" || return 1
            SERVER_PID=$SINK_PID
            ;;
        postfix)
            local dir
            dir=$(mktemp -d "$TMP/postfix.XXXXXX") || { FAIL_REASON="mktemp failed"; return 1; }
            PF_DIR=$dir
            pf_setup "$dir" "$port" "$rport"
            # `postfix check` creates the queue directories (post-install).
            # stderr is not a tty, so fatal errors only reach maillog_file.
            if ! timeout 30 "$POSTFIX" -c "$dir/etc" check >>"$dir/postfix-cmd.log" 2>&1; then
                FAIL_REASON="postfix check failed: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            PF_LIVE=$dir
            if ! (pin "$CPU_SERVER" timeout 30 "$POSTFIX" -c "$dir/etc" start) >>"$dir/postfix-cmd.log" 2>&1; then
                FAIL_REASON="postfix start failed: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            local i
            for ((i = 0; i < START_TIMEOUT * 20; i++)); do
                SERVER_PID=$(pf_master_pid "$dir") && break
                sleep 0.05
            done
            if [[ -z $SERVER_PID ]] || ! wait_port "$port" "$SERVER_PID" "$START_TIMEOUT"; then
                FAIL_REASON="postfix master not running/listening on $port: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                SERVER_PID=""
                return 1
            fi
            ;;
        ringmail | ringmail-mt | ringmail-pinned)
            ((HAVE_RINGMAIL)) || { FAIL_REASON="RINGMAIL=$RINGMAIL not found (cargo build --release -p ringmail)"; return 1; }
            local runtime=per-core
            [[ $name == ringmail-mt ]] && runtime=multi-thread
            [[ $name == ringmail-pinned ]] && runtime=per-core-pinned
            local spool
            spool=$(mktemp -d "$TMP/spool.XXXXXX") || { FAIL_REASON="mktemp failed"; return 1; }
            RM_SPOOL=$spool
            (pin "$CPU_SERVER" "$RINGMAIL" mx --listen "127.0.0.1:$port" --domain bench.test \
                --spool "$spool" --relay "127.0.0.1:$rport" --relay-protocol smtp \
                --hostname mx.bench.test --runtime "$runtime") >"$base.server.log" 2>&1 &
            SERVER_PID=$!
            PIDS+=("$SERVER_PID")
            if ! wait_port "$port" "$SERVER_PID" "$START_TIMEOUT"; then
                local why
                why=$(grep -m 1 -iE 'error|fatal|panic' "$base.server.log" 2>/dev/null || tail -n 1 "$base.server.log" 2>/dev/null)
                if kill -0 "$SERVER_PID" 2>/dev/null; then
                    FAIL_REASON="did not listen on $port within ${START_TIMEOUT}s: ${why:0:150}"
                else
                    FAIL_REASON="exited before listening on $port: ${why:0:150}"
                fi
                stop_pid "$SERVER_PID"
                SERVER_PID=""
                return 1
            fi
            ;;
        *)
            FAIL_REASON="unknown contender $name"
            return 1
            ;;
    esac
    return 0
}

stop_server() { # stop_server NAME: stop the contender and remove its temp dirs
    case $1 in
        postfix)
            if [[ -n ${PF_DIR:-} ]]; then
                [[ -n $PF_LIVE ]] && pf_stop "$PF_DIR"
                PF_LIVE=""
                # keep the instance's log and config next to the run
                cp "$PF_DIR/maillog" "$BASE.maillog" 2>/dev/null
                cp "$PF_DIR/etc/main.cf" "$BASE.main.cf" 2>/dev/null
                cp "$PF_DIR/etc/master.cf" "$BASE.master.cf" 2>/dev/null
                rm -rf "$PF_DIR"
                PF_DIR=""
            fi
            ;;
        *)
            [[ -n $SERVER_PID ]] && stop_pid "$SERVER_PID"
            [[ -n ${RM_SPOOL:-} ]] && rm -rf "$RM_SPOOL"
            RM_SPOOL=""
            ;;
    esac
    SERVER_PID=""
}

# ---------------------------------------------------------------- one run
run_one() { # run_one CONTENDER ROUND
    local name=$1 round=$2
    BASE="$RUN_DIR/$name--r$round"
    local port rport="" dsink_out="" dsink_pid=""
    SERVER_PID="" PF_DIR="" RM_SPOOL="" FAIL_REASON="failed to start"
    next_port
    port=$PORT
    if [[ $name != smtp-sink ]]; then
        next_port
        rport=$PORT
        dsink_out="$BASE.downstream.out"
        if ! start_sink "$rport" "$dsink_out"; then
            echo "downstream $FAIL_REASON" >"$BASE.fail"
            log "round $round: $name skipped: downstream $FAIL_REASON"
            return
        fi
        dsink_pid=$SINK_PID
    fi
    if ! start_server "$name" "$port" "$rport" "$BASE"; then
        echo "$FAIL_REASON" >"$BASE.fail"
        log "round $round: $name skipped: $FAIL_REASON"
        stop_server "$name"
        [[ -n $dsink_pid ]] && stop_pid "$dsink_pid"
        return
    fi
    log "round $round: $name on 127.0.0.1:$port${rport:+ -> sink :$rport} (pid $SERVER_PID)"

    local cpu0 cpu1 cpu2 t0 t1 t2="" rc=0 spid
    cpu0=$(python3 "$REPORT" cpu "$SERVER_PID")
    t0=$(now)
    # shellcheck disable=SC2086
    (pin "$CPU_CLIENT" timeout "$RUN_TIMEOUT" "$SMTP_SOURCE" -c $SOURCE_OPTS -s "$SESSIONS" -m "$MESSAGES" \
        -l "$SIZE" -M client.test -f sender@client.test -t rcpt@bench.test "127.0.0.1:$port") \
        >"$BASE.source.out" 2>"$BASE.source.err" &
    spid=$!
    PIDS+=("$spid")
    wait "$spid" || rc=$?
    forget_pid "$spid"
    t1=$(now)
    local accepted delivered=0 i
    local counter=$dsink_out
    [[ $name == smtp-sink ]] && counter="$BASE.server.out"
    accepted=$(source_count "$BASE.source.out")
    # Already all there (always for smtp-sink itself)? Then end-to-end = t1.
    (($(sink_count "$counter") >= accepted)) && t2=$t1
    cpu1=$(python3 "$REPORT" cpu "$SERVER_PID")
    # Wait (bounded) until everything accepted has arrived downstream.
    # t2 is taken before each look, so the counting pipeline's own time does
    # not add to the end-to-end time (resolution: the 50 ms poll interval).
    local t_look
    for ((i = 0; i < DRAIN_TIMEOUT * 20; i++)); do
        t_look=$(now)
        delivered=$(sink_count "$counter")
        if ((delivered >= accepted)); then
            t2=${t2:-$t_look}
            break
        fi
        sleep 0.05
    done
    t2=${t2:-$(now)}
    cpu2=$(python3 "$REPORT" cpu "$SERVER_PID")
    local alive=1
    kill -0 "$SERVER_PID" 2>/dev/null || alive=0
    stop_server "$name"
    [[ -n $dsink_pid ]] && stop_pid "$dsink_pid"

    python3 "$REPORT" result --out "$BASE.json" --contender "$name" --round "$round" \
        --messages "$MESSAGES" --sessions "$SESSIONS" --size "$SIZE" \
        --source-rc "$rc" --accepted "$accepted" --delivered "$delivered" \
        --t0 "$t0" --t1 "$t1" --t2 "$t2" --cpu0 "$cpu0" --cpu1 "$cpu1" --cpu2 "$cpu2" \
        --alive "$alive" --source-err "$BASE.source.err"
    local fail=""
    ((rc != 0)) && fail="smtp-source exit $rc: $(tail -n 1 "$BASE.source.err" | cut -c1-150)"
    ((alive)) || fail="server exited during the run${fail:+; $fail}"
    [[ -n $fail ]] && { echo "$fail" >"$BASE.fail"; log "  $name: $fail"; }
    log "  $name: accepted $accepted/$MESSAGES in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')s, delivered $delivered"
}

# ---------------------------------------------------------------- main
read -r -a LIST <<<"$CONTENDERS"
NC=${#LIST[@]}
FSYNC=$(python3 "$REPORT" fsync "$TMP")
FSTYPE=$(df -T "$TMP" | awk 'NR==2 {print $2 " on " $1}')
MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PFVER=$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo unknown)
log "run dir $RUN_DIR; contenders: ${LIST[*]}; repeats $REPEATS; $MESSAGES msgs x $SIZE B, $SESSIONS sessions"
log "spool fs: $FSTYPE; fsync: $FSYNC"

for ((round = 1; round <= REPEATS; round++)); do
    # Rotate the order each round so no contender always goes first.
    for ((k = 0; k < NC; k++)); do
        run_one "${LIST[$(((k + round - 1) % NC))]}" "$round"
    done
done

# ---------------------------------------------------------------- report
META="repeats=$REPEATS messages=$MESSAGES sessions=$SESSIONS size=$SIZE source_opts='${SOURCE_OPTS}' pf_main='${PF_MAIN}' cpu_client=${CPU_CLIENT:-any} cpu_server=${CPU_SERVER:-any} postfix=$PFVER"
# fsync latency depends on what else writes to the disk: measure again at the end.
FSYNC_END=$(python3 "$REPORT" fsync "$TMP")
MACHINE="nproc=$(nproc); cpu=$MODEL; kernel=$(uname -r); spool fs=$FSTYPE ($TMP); fsync (4 KiB write+fsync) start: $FSYNC, end: $FSYNC_END; loadavg start $LOAD_START, end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$REPORT" report --run-dir "$RUN_DIR" --md "$MD" --json "$JSON" \
    --contenders "${LIST[*]}" --meta "$META" --machine "$MACHINE" || exit 1
cat "$MD"
log "wrote $MD and $JSON"
