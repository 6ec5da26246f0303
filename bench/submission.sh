#!/usr/bin/env bash
# Side-by-side authenticated-submission benchmark on loopback:
#   ringmail     `ringmail msa --config` (SQLite store), relaying to a downstream smtp-sink
#   postfix      Postfix 3.7 as a submission server (a private instance: STARTTLS required,
#                SASL through a private Dovecot 2.3 auth service, reject_sender_login_mismatch),
#                relaying to a downstream smtp-sink
#   ringmail-lb  `ringmail lb --proxy-protocol v2` in front of the ringmail MSA
#   postfix-lb   the same `ringmail lb` in front of Postfix (smtpd_upstream_proxy_protocol=haproxy)
#
# The load is `ringmail-bench submit` (HDR histograms): CONCURRENCY clients, each a new
# connection per message: EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL/RCPT/DATA (SIZE bytes), QUIT;
# a run lasts DURATION or MAX_MESSAGES accepted messages, whichever comes first. Every run
# starts fresh servers (and a fresh downstream sink); contenders are interleaved and their
# order rotated each round. Both servers use the same certificate and verify the same stored
# password hash ({SSHA512}, which both understand), so TLS and hashing cost the same.
#
# Per run: msgs/s (accepted / wall time), p50/p90/p99 latency of a whole session, CPU of the
# contender's process trees (ringmail: msa [+ lb]; Postfix: master and its daemons + Dovecot
# [+ lb]) per accepted message, and how many messages reached the downstream sink.
#
# Results: bench/out/submission-<date>.md (table, also printed), .jsonl (every run) and
# bench/out/submission-<date>/ (configs and logs).
#
# Environment (defaults in brackets):
#   RINGMAIL / BENCH  binaries      [target/release/ringmail, target/release/ringmail-bench]
#   REPEATS           rounds        [3]
#   DURATION          per run       [10s]
#   MAX_MESSAGES      per run       [20000]
#   CONCURRENCY       clients       [16]
#   SIZE              message bytes [2048]
#   CONTENDERS        subset of: ringmail postfix ringmail-lb postfix-lb [all four]
#   KEY               rsa (2048) | ec (P-256): the servers' certificate key [rsa]
#   START_TIMEOUT     seconds a server gets to listen [10]
#   DRAIN_TIMEOUT     seconds to wait for the downstream sink after a run [60]
#   BASE_PORT         ports used: BASE_PORT+101..+900 [24500]
#   OUT               output directory [bench/out]
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

RINGMAIL=${RINGMAIL:-target/release/ringmail}
BENCH=${BENCH:-target/release/ringmail-bench}
REPEATS=${REPEATS:-3}
DURATION=${DURATION:-10s}
MAX_MESSAGES=${MAX_MESSAGES:-20000}
CONCURRENCY=${CONCURRENCY:-16}
SIZE=${SIZE:-2048}
CONTENDERS=${CONTENDERS:-"ringmail postfix ringmail-lb postfix-lb"}
KEY=${KEY:-rsa}
START_TIMEOUT=${START_TIMEOUT:-10}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60}
BASE_PORT=${BASE_PORT:-24500}
OUT=${OUT:-bench/out}

SMTP_SINK=/usr/sbin/smtp-sink
POSTFIX=/usr/sbin/postfix
DOVECOT=/usr/sbin/dovecot
REPORT="$ROOT/bench/smtp_report.py"
USER_ADDR=alice@bench.test
PASSWORD=bench-password-1
RCPT=bob@remote.test

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR="$OUT/submission-$STAMP"
MD="$OUT/submission-$STAMP.md"
RUNS="$OUT/submission-$STAMP.jsonl"
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
TMP=$(mktemp -d -t ringmail-submission.XXXXXX) || exit 1
chmod 755 "$TMP"

LOG_TAG=submission.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PIDS=()
PF_LIVE=""
DC_PID=""

stop_dovecot() {
    [[ -n $DC_PID ]] || return 0
    local p
    # Its children (auth, log, config, anvil) belong to this instance only.
    local kids
    kids=$(python3 "$BENCH_LIB_HELPER" tree "$DC_PID")
    stop_pid "$DC_PID"
    for p in $kids; do kill -KILL "$p" 2>/dev/null; done
    DC_PID=""
}
trap 'stop_dovecot; cleanup' EXIT
trap 'log "interrupted"; exit 130' INT TERM

for t in "$SMTP_SINK" "$POSTFIX" "$DOVECOT" "$RINGMAIL" "$BENCH"; do
    [[ -x $t ]] || { log "$t not found (postfix, dovecot-core; cargo build --release -p ringmail -p ringmail-bench)"; exit 1; }
done
((EUID == 0)) || { log "must run as root (private Postfix and Dovecot instances)"; exit 1; }
NEXT_PORT=$((BASE_PORT + 100))

# ---------------------------------------------------------------- shared material
if [[ $KEY == ec ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=smtp.bench.test -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
else
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
        -subj /CN=smtp.bench.test -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
fi
chmod 644 "$TMP/cert.pem" "$TMP/key.pem"
HASH=$(doveadm pw -s SSHA512 -p "$PASSWORD") || { log "doveadm pw failed"; exit 1; }
DB="$TMP/accounts.db"
"$RINGMAIL" accounts --db "sqlite:$DB" domain add bench.test >/dev/null || exit 1
echo "$PASSWORD" | "$RINGMAIL" accounts --db "sqlite:$DB" add "$USER_ADDR" --password-stdin >/dev/null || exit 1
sqlite3 "$DB" "UPDATE accounts SET password = '$HASH' WHERE address = '$USER_ADDR'" || exit 1
echo "$PASSWORD" | "$RINGMAIL" accounts --db "sqlite:$DB" auth "$USER_ADDR" --password-stdin >/dev/null \
    || { log "the {SSHA512} login is refused by the ringmail store"; exit 1; }

# ---------------------------------------------------------------- servers
pf_setup() { # pf_setup DIR PORT SINKPORT PROXY(0|1)
    local dir=$1 port=$2 rport=$3 proxy=$4
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
    chmod 755 "$dir" "$dir/etc" "$dir/queue"
    chown postfix "$dir/data"
    echo "$USER_ADDR $USER_ADDR" >"$dir/etc/sender_logins"
    cat >"$dir/etc/main.cf" <<EOF
# Private benchmark instance written by bench/submission.sh (not the system Postfix).
compatibility_level = 3.6
config_directory = $dir/etc
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = smtp.bench.test
mydomain = bench.test
myorigin = \$mydomain
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:$rport
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
# Submission: TLS before anything, SASL (Dovecot) required, senders must be the login's own.
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = $TMP/cert.pem
smtpd_tls_key_file = $TMP/key.pem
smtpd_tls_session_cache_database = btree:\${data_directory}/smtpd_scache
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_sasl_authenticated_header = yes
smtpd_sender_login_maps = texthash:$dir/etc/sender_logins
smtpd_client_restrictions = permit_sasl_authenticated, reject
smtpd_sender_restrictions = reject_sender_login_mismatch
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
maillog_file_prefixes = $dir
maillog_file = $dir/maillog
EOF
    ((proxy)) && echo "smtpd_upstream_proxy_protocol = haproxy" >>"$dir/etc/main.cf"
    pf_master_cf "$dir" "$port" "tlsmgr    unix  -       -       n       1000?   1       tlsmgr"
}

dc_start() { # dc_start DIR SOCKET -> DC_PID: Dovecot running only its auth service
    local dir=$1 sock=$2 i
    mkdir -p "$dir/run" "$dir/state"
    echo "$USER_ADDR:$HASH" >"$dir/passwd"
    chmod 644 "$dir/passwd"
    cat >"$dir/dovecot.conf" <<EOF
protocols = none
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/log
info_log_path = $dir/log
default_internal_user = dovecot
default_login_user = dovenull
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = passwd-file
  args = $dir/passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup
}
service auth {
  unix_listener $sock {
    mode = 0660
    user = postfix
    group = postfix
  }
}
EOF
    "$DOVECOT" -F -c "$dir/dovecot.conf" >>"$dir/stdout.log" 2>&1 &
    DC_PID=$!
    for ((i = 0; i < START_TIMEOUT * 20; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "$DC_PID" 2>/dev/null || break
        sleep 0.05
    done
    FAIL_REASON="dovecot auth socket $sock missing: $(tail -n 1 "$dir/log" "$dir/stdout.log" 2>/dev/null | tr '\n' ' ' | cut -c1-200)"
    return 1
}

# start_server NAME PORT SINKPORT BASE -> SERVER_PIDS (roots of the contender's process trees)
start_server() {
    local name=$1 port=$2 rport=$3 base=$4 proxy=0 i pid
    SERVER_PIDS=()
    [[ $name == *-lb ]] && proxy=1
    case $name in
        postfix*)
            local dir
            dir=$(mktemp -d "$TMP/postfix.XXXXXX") || return 1
            PF_DIR=$dir
            pf_setup "$dir" "$port" "$rport" "$proxy"
            if ! timeout 30 "$POSTFIX" -c "$dir/etc" check >>"$dir/postfix-cmd.log" 2>&1; then
                FAIL_REASON="postfix check failed: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            dc_start "$dir/dovecot" "$dir/queue/private/auth" || return 1
            PF_LIVE=$dir
            if ! timeout 30 "$POSTFIX" -c "$dir/etc" start >>"$dir/postfix-cmd.log" 2>&1; then
                FAIL_REASON="postfix start failed: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            pid=""
            for ((i = 0; i < START_TIMEOUT * 20; i++)); do
                pid=$(pf_master_pid "$dir") && break
                sleep 0.05
            done
            if [[ -z $pid ]] || ! wait_port "$port" "$pid" "$START_TIMEOUT"; then
                FAIL_REASON="postfix not listening on $port: $(tail -n 1 "$dir/maillog" 2>/dev/null | cut -c1-150)"
                return 1
            fi
            SERVER_PIDS=("$pid" "$DC_PID")
            ;;
        ringmail*)
            RM_DIR=$(mktemp -d "$TMP/ringmail.XXXXXX") || return 1
            cat >"$RM_DIR/msa.toml" <<EOF
[msa]
hostname = "smtp.bench.test"
listen = ["127.0.0.1:$port"]
accounts = "sqlite:$DB"
spool = "$RM_DIR/spool"
relay = "127.0.0.1:$rport"
max_messages_per_hour = 10000000
tls = { cert = "$TMP/cert.pem", key = "$TMP/key.pem" }
EOF
            ((proxy)) && echo 'trusted_proxies = ["127.0.0.1"]' >>"$RM_DIR/msa.toml"
            cp "$RM_DIR/msa.toml" "$base.msa.toml"
            "$RINGMAIL" msa --config "$RM_DIR/msa.toml" >"$base.msa.log" 2>&1 &
            pid=$!
            PIDS+=("$pid")
            SERVER_PIDS=("$pid")
            if ! wait_port "$port" "$pid" "$START_TIMEOUT"; then
                FAIL_REASON="ringmail msa not listening on $port: $(tail -n 1 "$base.msa.log" | cut -c1-150)"
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

stop_server() {
    local p
    if [[ -n ${PF_DIR:-} ]]; then
        [[ -n $PF_LIVE ]] && pf_stop "$PF_DIR"
        PF_LIVE=""
        stop_dovecot
        cp "$PF_DIR/maillog" "$BASE.maillog" 2>/dev/null
        cp "$PF_DIR/etc/main.cf" "$BASE.main.cf" 2>/dev/null
        cp "$PF_DIR/dovecot/log" "$BASE.dovecot.log" 2>/dev/null
        rm -rf "$PF_DIR"
        PF_DIR=""
    fi
    if [[ -n ${RM_DIR:-} ]]; then
        for p in "${SERVER_PIDS[@]}"; do stop_pid "$p"; done
        rm -rf "$RM_DIR"
        RM_DIR=""
    fi
    SERVER_PIDS=()
}

cpu_of() { # cpu_of PID... -> CPU seconds of all their trees
    local p total=0
    for p in "$@"; do
        total=$(awk -v a="$total" -v b="$(python3 "$REPORT" cpu "$p")" 'BEGIN{printf "%.3f", a+b}')
    done
    echo "$total"
}

# ---------------------------------------------------------------- one run
run_one() { # run_one CONTENDER ROUND
    local name=$1 round=$2 port rport target lb_pid="" sink_pid
    BASE="$RUN_DIR/$name--r$round"
    PF_DIR="" RM_DIR="" FAIL_REASON="failed to start" SERVER_PIDS=()
    next_port && rport=$PORT
    if ! start_sink "$rport" "$BASE.sink.out"; then
        log "round $round: $name skipped: sink: $FAIL_REASON"
        echo "{\"contender\":\"$name\",\"round\":$round,\"fail\":\"sink\"}" >>"$RUNS"
        return
    fi
    sink_pid=$SINK_PID
    next_port && port=$PORT
    target=$port
    local started=0
    if start_server "$name" "$port" "$rport" "$BASE"; then
        started=1
        if [[ $name == *-lb ]]; then
            next_port && target=$PORT
            "$RINGMAIL" lb --listen "127.0.0.1:$target" --backend "127.0.0.1:$port" \
                --proxy-protocol v2 >"$BASE.lb.log" 2>&1 &
            lb_pid=$!
            PIDS+=("$lb_pid")
            wait_port "$target" "$lb_pid" "$START_TIMEOUT" || { started=0; FAIL_REASON="lb not listening on $target"; }
        fi
    fi
    if ((started)); then
        local pids=("${SERVER_PIDS[@]}") cpu0 cpu1 load0 load1 json delivered=0 i msgs
        [[ -n $lb_pid ]] && pids+=("$lb_pid")
        # The same sender policy on both: a logged-in user may not send as someone else.
        local refused=false
        timeout 30 swaks --server 127.0.0.1 --port "$target" --tls --auth PLAIN --auth-user "$USER_ADDR" \
            --auth-password "$PASSWORD" --from eve@bench.test --to "$RCPT" >"$BASE.probe.log" 2>&1
        grep -q '^<~\* 553 5\.7\.1' "$BASE.probe.log" && refused=true
        load0=$(cut -d' ' -f1 /proc/loadavg)
        cpu0=$(cpu_of "${pids[@]}")
        json=$(timeout 120 "$BENCH" submit --target "127.0.0.1:$target" --user "$USER_ADDR" \
            --password "$PASSWORD" --rcpt "$RCPT" --concurrency "$CONCURRENCY" \
            --duration "$DURATION" --max-messages "$MAX_MESSAGES" --size "$SIZE" 2>"$BASE.bench.err")
        cpu1=$(cpu_of "${pids[@]}")
        load1=$(cut -d' ' -f1 /proc/loadavg)
        [[ -n $json ]] || json='{"messages":0,"failed":0,"msgs_per_sec":0,"first_error":"no output"}'
        msgs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["messages"])' "$json")
        for ((i = 0; i < DRAIN_TIMEOUT * 20; i++)); do
            delivered=$(sink_count "$BASE.sink.out")
            ((delivered >= msgs)) && break
            sleep 0.05
        done
        python3 - "$json" "$name" "$round" "$cpu0" "$cpu1" "$delivered" "$load0" "$load1" "$refused" >>"$RUNS" <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
d.update(contender=sys.argv[2], round=int(sys.argv[3]), cpu_s=float(sys.argv[5]) - float(sys.argv[4]),
         delivered=int(sys.argv[6]), load_start=float(sys.argv[7]), load_end=float(sys.argv[8]),
         foreign_sender_refused=sys.argv[9] == "true")
print(json.dumps(d))
EOF
        log "round $round: $name: $(tail -n 1 "$RUNS" | cut -c1-220)"
    else
        log "round $round: $name skipped: $FAIL_REASON"
        echo "{\"contender\":\"$name\",\"round\":$round,\"fail\":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$FAIL_REASON")}" >>"$RUNS"
    fi
    [[ -n $lb_pid ]] && stop_pid "$lb_pid"
    stop_server
    stop_pid "$sink_pid"
}

# ---------------------------------------------------------------- main
read -r -a LIST <<<"$CONTENDERS"
NC=${#LIST[@]}
: >"$RUNS"
MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "run dir $RUN_DIR; contenders: ${LIST[*]}; $REPEATS rounds of $DURATION (max $MAX_MESSAGES msgs), $CONCURRENCY clients"
for ((round = 1; round <= REPEATS; round++)); do
    for ((k = 0; k < NC; k++)); do
        run_one "${LIST[$(((k + round - 1) % NC))]}" "$round"
    done
done

META="repeats=$REPEATS duration=$DURATION max_messages=$MAX_MESSAGES concurrency=$CONCURRENCY size=$SIZE key=$KEY postfix=$(dpkg-query -W -f '${Version}' postfix 2>/dev/null) dovecot=$(dpkg-query -W -f '${Version}' dovecot-core 2>/dev/null) commit=$(git rev-parse --short HEAD 2>/dev/null)"
MACHINE="nproc=$(nproc); cpu=$MODEL; kernel=$(uname -r); loadavg start $LOAD_START, end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RUNS" "$MD" "$META" "$MACHINE" "${LIST[@]}" <<'EOF'
import json, statistics, sys
runs_f, md, meta, machine, *names = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_f) if l.strip()]
by = {n: [r for r in runs if r["contender"] == n] for n in names}
def ok(r):
    return "fail" not in r and r["messages"] > 0 and r["failed"] == 0
def med(xs):
    return statistics.median(xs) if xs else None
rate = {n: med([r["msgs_per_sec"] for r in by[n] if ok(r)]) for n in names}
L = [f"# Authenticated submissions ({md.rsplit('/', 1)[-1][:-3]})", "", f"{meta}", "", f"Machine: {machine}", "",
     "| contender | msgs/s min | median | max | vs postfix (median) | p50 ms | p99 ms | CPU ms/msg | delivered/accepted | foreign sender 553 5.7.1 | failed runs | load avg during runs |",
     "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
for n in names:
    good = [r for r in by[n] if ok(r)]
    bad = len(by[n]) - len(good)
    if not good:
        why = "; ".join(str(r.get("fail") or r.get("first_error")) for r in by[n])[:200]
        L.append(f"| {n} | n/a | n/a | n/a | | | | | | | {bad} ({why}) | |")
        continue
    rates = sorted(r["msgs_per_sec"] for r in good)
    mrun = sorted(good, key=lambda r: r["msgs_per_sec"])[len(good) // 2]
    peer = "postfix-lb" if n.endswith("-lb") else "postfix"
    ratio = f"{rate[n] / rate[peer]:.2f}x" if rate.get(peer) else ""
    cpu = med([1000 * r["cpu_s"] / r["messages"] for r in good])
    acc = sum(r["messages"] for r in good); dlv = sum(r["delivered"] for r in good)
    refused = sum(r.get("foreign_sender_refused", False) for r in good)
    loads = ", ".join(f"{r['load_start']:.1f}-{r['load_end']:.1f}" for r in good)
    L.append(f"| {n} | {rates[0]:,.0f} | {rate[n]:,.0f} | {rates[-1]:,.0f} | {ratio} | {mrun['p50_ms']:.1f} | {mrun['p99_ms']:.1f} | {cpu:.2f} | {dlv}/{acc} | {refused}/{len(good)} | {bad} | {loads} |")
L += ["", "Ratios: ringmail vs postfix (direct), ringmail-lb vs postfix-lb (both behind `ringmail lb` with PROXY v2)."]
open(md, "w").write("\n".join(L) + "\n")
print("\n".join(L))
EOF
log "wrote $MD and $RUNS"
