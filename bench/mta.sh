#!/usr/bin/env bash
# Side-by-side benchmark of outbound DELIVERY throughput from the queue, on loopback:
#   ringmail-rsa      `ringmail mta`, every message DKIM-signed with an RSA-2048 key,
#   ringmail-ed25519  the same with an Ed25519 key,
#   ringmail-nosign   the same without a DKIM key,
#   postfix           a private Postfix instance relaying the same load, unsigned (Postfix has
#                     no DKIM of its own),
#   smtp-sink-direct  smtp-source straight into smtp-sink: the protocol limit of the load
#                     generator + kernel (no queue at all).
#
# "From the queue": each run first fills the contender's queue while delivery is held, then
# starts the downstream smtp-sink, releases the queue and times the drain until the sink has
# received every message.
#   ringmail: the relay (--relay 127.0.0.1:SINKPORT) is down during the fill, so every
#     message's first attempt fails (connection refused) and is rescheduled retry_min (5 min)
#     later; the script waits until ringmail_mx_deliveries_total{result="deferred"} has
#     counted every message, starts the sink, and the clock starts just before
#     `ringmail queue --admin A flush`.
#   postfix: filled with `defer_transports = smtp relay` (the queue manager moves every
#     message to the deferred queue without trying it); the script waits until every message
#     sits in the deferred queue, starts the sink, sets `defer_transports =`, runs
#     `postfix reload` and waits for the new qmgr, and the clock starts just before
#     `postqueue -f`.
#   smtp-sink-direct: no queue; the clock runs from the start of smtp-source until the sink
#     has counted every message.
# All contenders send the same prepared message (MSGFILE, `smtp-source -F`): SIZE bytes in
# all including headers, From: <alice@example.test> (the DKIM signing domain), to
# bob@remote.test, one recipient, SESSIONS (20) concurrent sessions for the fill.
#
# Concurrency towards the sink: ringmail's max_per_destination default (20, connections
# reused) and Postfix's default_destination_concurrency_limit (20, set explicitly in main.cf;
# Postfix starts at initial_destination_concurrency 5 and ramps up, and caches connections
# on demand). smtp-sink-direct uses SESSIONS sessions with DIRECT_OPTS (default -d: keep
# each connection for several messages, as both MTAs reuse theirs).
#
# Per run: drain msgs/s = messages / (time until the sink has them all); CPU of the
# contender's process tree during the drain (utime+stime+cutime+cstime from /proc, via
# bench/smtp_report.py cpu; for smtp-sink-direct: smtp-source's own CPU) -> CPU ms/msg; the
# sink's CPU likewise; for ringmail the DKIM signature count from /metrics.
#
# Results: bench/out/mta-<date>.md (table, also printed), bench/out/mta-<date>.json and
# bench/out/mta-<date>/ (per-run JSON and logs).
#
# Environment (defaults in brackets):
#   RINGMAIL       ringmail binary                               [target/release/ringmail]
#   REPEATS        rounds per contender                          [3]
#   MESSAGES       messages per run                              [5000]
#   SIZE           message size in bytes, headers included       [2048]
#   SESSIONS       smtp-source sessions (fill; direct run)       [20]
#   CONTENDERS     subset of: ringmail-rsa ringmail-ed25519 ringmail-nosign postfix
#                  smtp-sink-direct                              [all]
#   DIRECT_OPTS    extra smtp-source flags for smtp-sink-direct  [-d]
#   PF_MAIN        extra main.cf lines for Postfix, ';'-separated []
#   START_TIMEOUT  seconds a server gets to listen               [10]
#   FILL_TIMEOUT   bound for filling the queue (smtp-source), s  [600]
#   HOLD_TIMEOUT   bound for every message to be deferred, s     [120]
#   DRAIN_TIMEOUT  bound for the drain, s                        [600]
#   BASE_PORT      ports used: BASE_PORT+101..+900               [23500]
#   OUT            output directory                              [bench/out]
#   TMPDIR         where spools / Postfix instances live          [/tmp]

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

RINGMAIL=${RINGMAIL:-target/release/ringmail}
REPEATS=${REPEATS:-3}
MESSAGES=${MESSAGES:-5000}
SIZE=${SIZE:-2048}
SESSIONS=${SESSIONS:-20}
CONTENDERS=${CONTENDERS:-"ringmail-rsa ringmail-ed25519 ringmail-nosign postfix smtp-sink-direct"}
DIRECT_OPTS=${DIRECT_OPTS--d}
PF_MAIN=${PF_MAIN:-}
START_TIMEOUT=${START_TIMEOUT:-10}
FILL_TIMEOUT=${FILL_TIMEOUT:-600}
HOLD_TIMEOUT=${HOLD_TIMEOUT:-120}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-600}
BASE_PORT=${BASE_PORT:-23500}
OUT=${OUT:-bench/out}

SMTP_SINK=/usr/sbin/smtp-sink
SMTP_SOURCE=/usr/sbin/smtp-source
POSTFIX=/usr/sbin/postfix
POSTCONF=/usr/sbin/postconf
POSTQUEUE=/usr/sbin/postqueue
HELPER="$ROOT/bench/smtp_report.py" # cpu / tree / fsync helpers shared with smtp.sh
REPORT="$ROOT/bench/mta_report.py"

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR="$OUT/mta-$STAMP"
MD="$OUT/mta-$STAMP.md"
JSON="$OUT/mta-$STAMP.json"
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
TMP=$(mktemp -d -t ringmail-mta.XXXXXX) || exit 1
# Postfix daemons run as user postfix and must reach their queue directory.
chmod 755 "$TMP"

# ---------------------------------------------------------------- cleanup
LOG_TAG=mta.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PIDS=()    # background processes we started (sinks, ringmail, smtp-source)
PF_LIVE="" # config dir of a running Postfix instance, if any

trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

metric() { # metric ADMINPORT NAME_WITH_LABELS -> value (empty if unavailable)
    curl -s --max-time 5 "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk -v k="$2" '$1 == k {print $2; exit}'
}

# ---------------------------------------------------------------- preflight
for t in "$SMTP_SINK" "$SMTP_SOURCE" "$POSTFIX" "$POSTCONF" "$POSTQUEUE"; do
    [[ -x $t ]] || { log "$t not found; install postfix (apt-get install -y postfix, 'No configuration')"; exit 1; }
done
for t in python3 curl; do
    command -v "$t" >/dev/null || { log "$t is required"; exit 1; }
done
id postfix >/dev/null 2>&1 || { log "user postfix missing (postfix package not set up)"; exit 1; }
((EUID == 0)) || { log "must run as root (private Postfix instance, smtp-sink -u postfix)"; exit 1; }
HAVE_RINGMAIL=1
if [[ ! -x $RINGMAIL ]]; then
    HAVE_RINGMAIL=0
    log "RINGMAIL=$RINGMAIL not found: ringmail cells will be n/a (build: cargo build --release)"
fi

# ---------------------------------------------------------------- ports
NEXT_PORT=$((BASE_PORT + 100))

# ---------------------------------------------------------------- the message and the keys
MSGFILE="$TMP/message.txt"
python3 "$REPORT" message --size "$SIZE" --out "$MSGFILE" || exit 1
KEY_RSA="$TMP/dkim-rsa.key"
KEY_ED="$TMP/dkim-ed25519.key"
if ((HAVE_RINGMAIL)); then
    "$RINGMAIL" dkim keygen --domain example.test --selector bench-rsa --algo rsa --out "$KEY_RSA" \
        >"$RUN_DIR/dkim-rsa.txt" 2>&1 || log "RSA keygen failed: $(tail -n 1 "$RUN_DIR/dkim-rsa.txt")"
    "$RINGMAIL" dkim keygen --domain example.test --selector bench-ed --algo ed25519 --out "$KEY_ED" \
        >"$RUN_DIR/dkim-ed25519.txt" 2>&1 || log "Ed25519 keygen failed: $(tail -n 1 "$RUN_DIR/dkim-ed25519.txt")"
fi

# ---------------------------------------------------------------- servers

pf_setup() { # pf_setup DIR PORT RELAYPORT: write a private Postfix instance (as bench/smtp.sh)
    local dir=$1 port=$2 rport=$3
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
    chmod 755 "$dir" "$dir/etc" "$dir/queue"
    chown postfix "$dir/data"
    cat >"$dir/etc/main.cf" <<EOF
# Private benchmark instance written by bench/mta.sh (not the system Postfix).
compatibility_level = 3.6
config_directory = $dir/etc
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.example.test
mydomain = example.test
myorigin = \$mydomain
# Nothing is delivered locally: everything goes to the smart host, the downstream smtp-sink.
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
relayhost = [127.0.0.1]:$rport
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit
# No DNS anywhere.
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
maillog_file_prefixes = $dir
maillog_file = $dir/maillog
# The same per-destination concurrency as ringmail's max_per_destination (this is the default).
default_destination_concurrency_limit = 20
# Hold delivery while the queue fills; the run clears this, reloads and flushes.
defer_transports = smtp relay
EOF
    if [[ -n $PF_MAIN ]]; then
        local line
        IFS=';' read -r -a extra <<<"$PF_MAIN"
        for line in "${extra[@]}"; do printf '%s\n' "$line" >>"$dir/etc/main.cf"; done
    fi
    pf_master_cf "$dir" "$port"
}

pf_count() { # pf_count DIR SUBQUEUE... -> number of queue files in those queues
    local dir=$1 q n=0
    shift
    for q in "$@"; do
        n=$((n + $(find "$dir/queue/$q" -type f 2>/dev/null | wc -l)))
    done
    echo "$n"
}

pf_qmgr_pid() { # pf_qmgr_pid MASTERPID -> pid of its qmgr child, if any
    local p
    for p in $(pgrep -P "$1" 2>/dev/null); do
        [[ $(cat "/proc/$p/comm" 2>/dev/null) == qmgr ]] && { echo "$p"; return 0; }
    done
    return 1
}

# start_server NAME PORT SINKPORT ADMINPORT -> SERVER_PID; FAIL_REASON on failure
start_server() {
    local name=$1 port=$2 rport=$3 aport=$4
    SERVER_PID=""
    case $name in
        postfix)
            local dir
            dir=$(mktemp -d "$TMP/postfix.XXXXXX") || { FAIL_REASON="mktemp failed"; return 1; }
            PF_DIR=$dir
            pf_setup "$dir" "$port" "$rport"
            if ! timeout 30 "$POSTFIX" -c "$dir/etc" check >>"$dir/postfix-cmd.log" 2>&1; then
                FAIL_REASON="postfix check failed: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            PF_LIVE=$dir
            if ! timeout 30 "$POSTFIX" -c "$dir/etc" start >>"$dir/postfix-cmd.log" 2>&1; then
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
        ringmail-*)
            ((HAVE_RINGMAIL)) || { FAIL_REASON="RINGMAIL=$RINGMAIL not found (cargo build --release)"; return 1; }
            local dkim=()
            case $name in
                ringmail-rsa) dkim=(--dkim "example.test:bench-rsa:$KEY_RSA") ;;
                ringmail-ed25519) dkim=(--dkim "example.test:bench-ed:$KEY_ED") ;;
                ringmail-nosign) ;;
                *) FAIL_REASON="unknown contender $name"; return 1 ;;
            esac
            local spool
            spool=$(mktemp -d "$TMP/spool.XXXXXX") || { FAIL_REASON="mktemp failed"; return 1; }
            RM_SPOOL=$spool
            "$RINGMAIL" mta --listen "127.0.0.1:$port" --spool "$spool" --relay "127.0.0.1:$rport" \
                --no-mta-sts --hostname mta.example.test --admin "127.0.0.1:$aport" "${dkim[@]}" \
                >"$BASE.server.log" 2>&1 &
            SERVER_PID=$!
            PIDS+=("$SERVER_PID")
            if ! wait_port "$port" "$SERVER_PID" "$START_TIMEOUT" || ! wait_port "$aport" "$SERVER_PID" "$START_TIMEOUT"; then
                local why
                why=$(grep -m 1 -iE 'error|fatal|panic' "$BASE.server.log" 2>/dev/null || tail -n 1 "$BASE.server.log" 2>/dev/null)
                if kill -0 "$SERVER_PID" 2>/dev/null; then
                    FAIL_REASON="did not listen on $port/$aport within ${START_TIMEOUT}s: ${why:0:150}"
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
                cp "$PF_DIR/maillog" "$BASE.maillog" 2>/dev/null
                cp "$PF_DIR/etc/main.cf" "$BASE.main.cf" 2>/dev/null
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

fail_run() { # fail_run REASON: record, log, tear down
    echo "$1" >"$BASE.fail"
    log "  $NAME: $1"
    stop_server "$NAME"
    [[ -n ${DSINK_PID:-} ]] && stop_pid "$DSINK_PID"
    DSINK_PID=""
}

# ---------------------------------------------------------------- one run
run_one() { # run_one CONTENDER ROUND
    NAME=$1
    local name=$1 round=$2
    BASE="$RUN_DIR/$name--r$round"
    local port rport aport
    SERVER_PID="" PF_DIR="" RM_SPOOL="" FAIL_REASON="failed to start" DSINK_PID=""
    next_port; port=$PORT
    next_port; rport=$PORT
    next_port; aport=$PORT
    local sink_out="$BASE.sink.out"
    local accepted=$MESSAGES fill_s=0 hold_s=0 release_s=0 signed="" signed_held="" deferred_fill="" t_fill0 t_fill1 rc=0 i

    if [[ $name != smtp-sink-direct ]]; then
        if ! start_server "$name" "$port" "$rport" "$aport"; then
            fail_run "$FAIL_REASON"
            return
        fi
        log "round $round: $name on 127.0.0.1:$port -> sink :$rport (pid $SERVER_PID); filling"
        # ---- fill, delivery held
        t_fill0=$(now)
        timeout "$FILL_TIMEOUT" "$SMTP_SOURCE" -c -s "$SESSIONS" -m "$MESSAGES" -F "$MSGFILE" \
            -M client.test -f alice@example.test -t bob@remote.test "127.0.0.1:$port" \
            >"$BASE.fill.out" 2>"$BASE.fill.err" || rc=$?
        t_fill1=$(now)
        fill_s=$(awk -v a="$t_fill0" -v b="$t_fill1" 'BEGIN{printf "%.3f", b-a}')
        accepted=$(source_count "$BASE.fill.out")
        if ((rc != 0 || accepted != MESSAGES)); then
            fail_run "fill: smtp-source exit $rc, accepted $accepted/$MESSAGES: $(tail -n 1 "$BASE.fill.err" | cut -c1-150)"
            return
        fi
        # ---- wait (bounded) until every message is held
        local held=0
        for ((i = 0; i < HOLD_TIMEOUT * 10; i++)); do
            if [[ $name == postfix ]]; then
                held=$(pf_count "$PF_DIR" deferred)
                (($(pf_count "$PF_DIR" maildrop incoming active) == 0 && held >= accepted)) && break
            else
                held=$(metric "$aport" 'ringmail_mx_deliveries_total{result="deferred"}')
                held=${held:-0}
                ((held >= accepted)) && break
            fi
            sleep 0.1
        done
        hold_s=$(awk -v a="$t_fill1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')
        deferred_fill=$held
        if ((held < accepted)); then
            fail_run "only $held of $accepted messages deferred within ${HOLD_TIMEOUT}s after the fill"
            return
        fi
        if [[ $name == ringmail-* ]]; then
            curl -s --max-time 5 "http://127.0.0.1:$aport/metrics" >"$BASE.metrics-held.txt" 2>/dev/null
            signed_held=$(awk '$1 == "ringmail_mta_dkim_signed_total" {print $2}' "$BASE.metrics-held.txt")
            local early
            early=$(metric "$aport" 'ringmail_mx_deliveries_total{result="delivered"}')
            if [[ ${early:-0} != 0 ]]; then
                fail_run "ringmail reports $early deliveries while the sink was down"
                return
            fi
        fi
        log "  $name: filled $accepted in ${fill_s}s, all deferred after ${hold_s}s more"
    fi

    # ---- the sink
    if ! start_sink "$rport" "$sink_out"; then
        fail_run "sink: $FAIL_REASON"
        return
    fi
    DSINK_PID=$SINK_PID

    if [[ $name == postfix ]]; then
        # Release: clear defer_transports, reload, wait for the new qmgr. Not timed (the
        # equivalent of ringmail's sink being down is config state here).
        local qold qnew="" r0
        r0=$(now)
        qold=$(pf_qmgr_pid "$SERVER_PID") || qold=""
        timeout 20 "$POSTCONF" -c "$PF_DIR/etc" -e 'defer_transports =' >>"$PF_DIR/postfix-cmd.log" 2>&1
        timeout 20 "$POSTFIX" -c "$PF_DIR/etc" reload >>"$PF_DIR/postfix-cmd.log" 2>&1
        for ((i = 0; i < 200; i++)); do
            qnew=$(pf_qmgr_pid "$SERVER_PID") && [[ $qnew != "$qold" ]] && break
            qnew=""
            sleep 0.05
        done
        release_s=$(awk -v a="$r0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')
        if [[ -z $qnew ]]; then
            fail_run "no new qmgr within 10 s of postfix reload (old qmgr ${qold:-none})"
            return
        fi
        local early
        early=$(sink_count "$sink_out")
        ((early > 0)) && log "  postfix: $early messages reached the sink before postqueue -f"
    fi

    # ---- the timed drain
    local cpu_pid cpu0 cpu1 scpu0 scpu1 t0 t1="" delivered=0 flush_rc=0 srccpu=""
    cpu_pid=$SERVER_PID
    scpu0=$(python3 "$HELPER" cpu "$DSINK_PID")
    cpu0=0
    [[ -n $cpu_pid ]] && cpu0=$(python3 "$HELPER" cpu "$cpu_pid")
    t0=$(now)
    case $name in
        postfix)
            timeout 30 "$POSTQUEUE" -c "$PF_DIR/etc" -f >>"$PF_DIR/postfix-cmd.log" 2>&1 || flush_rc=$?
            ;;
        ringmail-*)
            timeout 30 "$RINGMAIL" queue --spool "$RM_SPOOL" --admin "127.0.0.1:$aport" flush \
                >"$BASE.flush.out" 2>&1 || flush_rc=$?
            ;;
        smtp-sink-direct)
            # smtp-source's own CPU (rusage of the child) stands in for the sender's tree.
            # shellcheck disable=SC2086
            python3 "$REPORT" rusage --out "$BASE.source.cpu" -- \
                timeout "$DRAIN_TIMEOUT" "$SMTP_SOURCE" -c $DIRECT_OPTS -s "$SESSIONS" -m "$MESSAGES" -F "$MSGFILE" \
                -M client.test -f alice@example.test -t bob@remote.test "127.0.0.1:$rport" \
                >"$BASE.source.out" 2>"$BASE.source.err" &
            local spid=$!
            PIDS+=("$spid")
            wait "$spid" || flush_rc=$?
            forget_pid "$spid"
            srccpu=$(cat "$BASE.source.cpu" 2>/dev/null)
            accepted=$(source_count "$BASE.source.out")
            ;;
    esac
    local release_cmd_s
    release_cmd_s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')
    [[ $name == smtp-sink-direct ]] || log "  $name: release command returned after ${release_cmd_s}s"
    if ((flush_rc != 0)); then
        log "  $name: release/flush command exit $flush_rc"
    fi
    # Wait (bounded) until the sink has every message; t1 is taken before each look.
    local t_look deadline
    deadline=$(awk -v a="$t0" -v d="$DRAIN_TIMEOUT" 'BEGIN{printf "%.3f", a+d}')
    while :; do
        t_look=$(now)
        delivered=$(sink_count "$sink_out")
        if ((delivered >= accepted && accepted > 0)); then
            t1=$t_look
            break
        fi
        awk -v a="$t_look" -v d="$deadline" 'BEGIN{exit !(a > d)}' && break
        sleep 0.05
    done
    t1=${t1:-$(now)}
    cpu1=0
    [[ -n $cpu_pid ]] && cpu1=$(python3 "$HELPER" cpu "$cpu_pid")
    [[ -n $srccpu ]] && { cpu0=0; cpu1=$srccpu; }
    scpu1=$(python3 "$HELPER" cpu "$DSINK_PID")
    local alive=1
    [[ -n $cpu_pid ]] && { kill -0 "$cpu_pid" 2>/dev/null || alive=0; }

    # ---- after the drain: duplicates?, queue state, signatures
    sleep 1
    local sink_final queue_left=""
    sink_final=$(sink_count "$sink_out")
    if [[ $name == ringmail-* ]]; then
        curl -s --max-time 5 "http://127.0.0.1:$aport/metrics" >"$BASE.metrics-end.txt" 2>/dev/null
        signed=$(awk '$1 == "ringmail_mta_dkim_signed_total" {print $2}' "$BASE.metrics-end.txt")
        queue_left=$(awk '$1 == "ringmail_queue_messages" {print $2}' "$BASE.metrics-end.txt")
    elif [[ $name == postfix ]]; then
        queue_left=$(pf_count "$PF_DIR" maildrop incoming active deferred hold)
    fi
    stop_server "$name"
    stop_pid "$DSINK_PID"
    DSINK_PID=""

    python3 "$REPORT" result --out "$BASE.json" --contender "$name" --round "$round" \
        --messages "$MESSAGES" --size "$SIZE" --accepted "$accepted" --delivered "$delivered" \
        --sink-final "$sink_final" --t0 "$t0" --t1 "$t1" --cpu0 "$cpu0" --cpu1 "$cpu1" \
        --sink-cpu0 "$scpu0" --sink-cpu1 "$scpu1" --alive "$alive" --release-rc "$flush_rc" \
        --fill-s "$fill_s" --hold-s "$hold_s" --release-s "$release_s" --release-cmd-s "$release_cmd_s" \
        --deferred-fill "${deferred_fill:-}" --signed "${signed:-}" --signed-held "${signed_held:-}" --queue-left "${queue_left:-}"
    local fail=""
    ((delivered < accepted)) && fail="sink received $delivered of $accepted within ${DRAIN_TIMEOUT}s"
    ((flush_rc != 0)) && fail="${fail:+$fail; }release/flush/source exit $flush_rc"
    ((alive)) || fail="contender exited during the run${fail:+; $fail}"
    [[ -n $fail ]] && { echo "$fail" >"$BASE.fail"; log "  $name: $fail"; }
    log "  $name: drained $delivered/$accepted in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')s (sink final $sink_final${signed:+, signed $((signed - ${signed_held:-0}))}${queue_left:+, left in queue $queue_left})"
}

# ---------------------------------------------------------------- main
read -r -a LIST <<<"$CONTENDERS"
NC=${#LIST[@]}
FSYNC=$(python3 "$HELPER" fsync "$TMP")
FSTYPE=$(df -T "$TMP" | awk 'NR==2 {print $2 " on " $1}')
MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PFVER=$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo unknown)
RMVER=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
log "run dir $RUN_DIR; contenders: ${LIST[*]}; repeats $REPEATS; $MESSAGES msgs x $SIZE B"
log "spool fs: $FSTYPE; fsync: $FSYNC"

for ((round = 1; round <= REPEATS; round++)); do
    # Rotate the order each round so no contender always goes first.
    for ((k = 0; k < NC; k++)); do
        run_one "${LIST[$(((k + round - 1) % NC))]}" "$round"
    done
done

# ---------------------------------------------------------------- report
META="repeats=$REPEATS messages=$MESSAGES size=$SIZE sessions=$SESSIONS direct_opts='${DIRECT_OPTS}' pf_main='${PF_MAIN}' postfix=$PFVER ringmail=$RMVER"
FSYNC_END=$(python3 "$HELPER" fsync "$TMP")
MACHINE="nproc=$(nproc); cpu=$MODEL; kernel=$(uname -r); spool fs=$FSTYPE ($TMP); fsync (4 KiB write+fsync) start: $FSYNC, end: $FSYNC_END; loadavg start $LOAD_START, end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$REPORT" report --run-dir "$RUN_DIR" --md "$MD" --json "$JSON" \
    --contenders "${LIST[*]}" --meta "$META" --machine "$MACHINE" || exit 1
cat "$MD"
log "wrote $MD and $JSON"
