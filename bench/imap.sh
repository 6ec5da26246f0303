#!/usr/bin/env bash
# Side-by-side IMAP benchmark on loopback: `ringmail mda` (its IMAP server) against Dovecot 2.3
# (Debian dovecot-imapd, a private instance), both over implicit TLS, both serving an
# identical copy of the same Maildir.
#
#   REPEATS=3 MESSAGES=2000 SESSIONS=16 DURATION=10s IDLE_SESSIONS=2000 IMAP_RATE=1000000 bash bench/imap.sh
#
# CONTENDERS (default "ringmail dovecot") and MODES (default "load idle") select a subset,
# e.g. CONTENDERS=ringmail MODES=idle IDLE_SESSIONS=10000 for ringmail's idle figure alone.
#
# Setup: a fresh account store (bob@example.test), MESSAGES messages (sizes 1-16 KiB, seeded)
# delivered over LMTP into ringmail's Maildir by ringmail mda itself; then, with ringmail
# stopped, bob's home is copied for Dovecot (owned by nobody:nogroup, Dovecot's mail user).
# Both servers get the same self-signed P-256 certificate.
#
# Each round (contender order alternates between rounds), for each contender:
#   load: a fresh server; `ringmail-bench imap load` for 2 s (warm-up, discarded), then for
#     DURATION with SESSIONS sessions: a random mix of UID FETCH (BODY.PEEK[HEADER]),
#     UID FETCH (BODY.PEEK[]), UID STORE +/-FLAGS (\Flagged), FETCH 1:* (FLAGS) and NOOP
#     (weights MIX); server CPU over its whole process tree.
#   idle: a fresh server; the RSS (and PSS) of its whole process tree (the PID and every
#     descendant) before the first connection and with IDLE_SESSIONS sessions in IDLE
#     (LOGIN, SELECT INBOX, IDLE over TLS); (after - before) / sessions.
# ringmail's per-session command rate limit (500 commands/s sustained, bursts of 1000 by
# default; a policy Dovecot does not have) is raised to IMAP_RATE (default 1000000, i.e. off),
# as Dovecot's process limits are raised below; IMAP_RATE=500 measures the default.
# Dovecot runs in its default login mode (one imap-login process per connection, which stays
# as the TLS proxy, plus one imap process per session); only its limits are raised so that
# IDLE_SESSIONS sessions fit (process_limit, client_limit, mail_max_userip_connections), and
# so are ringmail's per-address and per-user-and-address connection limits (50 and 10 by
# default), since every benchmark session logs in as one user from 127.0.0.1.
#
# Output: bench/out/imap-<timestamp>.md (table) and .jsonl (every run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPEATS=${REPEATS:-3}
MESSAGES=${MESSAGES:-2000}
SESSIONS=${SESSIONS:-16}
DURATION=${DURATION:-10s}
IDLE_SESSIONS=${IDLE_SESSIONS:-2000}
IMAP_RATE=${IMAP_RATE:-1000000}
LIMIT=$((IDLE_SESSIONS + 200))
CONTENDERS=${CONTENDERS:-ringmail dovecot}
MODES=${MODES:-load idle}
MIX=${MIX:-header=4,body=2,store=2,flags=1,noop=1}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RINGMAIL=${RINGMAIL:-$TARGET_DIR/release/ringmail}
BENCH=${BENCH:-$TARGET_DIR/release/ringmail-bench}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=bench/out/imap-$STAMP
mkdir -p bench/out
command -v dovecot >/dev/null || { echo "dovecot not installed (apt-get install -y dovecot-imapd)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "needs root (Dovecot's private instance)" >&2; exit 1; }

ulimit -n $((IDLE_SESSIONS * 4 + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
TMP=$(mktemp -d -t ringmail-imap.XXXXXX)
chmod 755 "$TMP"
SERVER_PID=""

stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
cleanup() {
    stop_server
    # Dovecot children left behind (if the master died first) belong to this instance only:
    # they run with our private config directory on their command line or in their cwd.
    for p in $(pgrep -f "$TMP" 2>/dev/null || true); do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

if [[ ${BUILD:-1} == 1 ]]; then # BUILD=0: use RINGMAIL and BENCH as they are
    echo "building (release)..." >&2
    cargo build --release -p ringmail -p ringmail-bench >&2
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT: up to 30 s
    for _ in $(seq 300); do
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2).close()' "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

USER_ADDR=bob@example.test
PASSWORD=bench-imap-password-1
DB="sqlite:$TMP/accounts.db"
"$RINGMAIL" accounts --db "$DB" domain add example.test >/dev/null
echo "$PASSWORD" | "$RINGMAIL" accounts --db "$DB" add "$USER_ADDR" --password-stdin >/dev/null

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=localhost -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
chmod 644 "$TMP/key.pem"

RM_MAIL=$TMP/rm-mail
RM_LMTP=$(free_port)
RM_IMAPS=$(free_port)
start_ringmail() {
    "$RINGMAIL" mda --lmtp "127.0.0.1:$RM_LMTP" --imaps "127.0.0.1:$RM_IMAPS" --maildir "$RM_MAIL" \
        --accounts "$DB" --hostname mail.example.test --tls-cert "$TMP/cert.pem" \
        --tls-key "$TMP/key.pem" --imap-commands-per-second "$IMAP_RATE" \
        --imap-max-connections-per-ip "$LIMIT" --imap-max-userip-connections "$LIMIT" \
        >>"$TMP/ringmail.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$RM_IMAPS"
    wait_port "$RM_LMTP"
}

echo "delivering $MESSAGES messages over LMTP..." >&2
start_ringmail
python3 - "$RM_LMTP" "$MESSAGES" "$USER_ADDR" <<'EOF'
import random, smtplib, sys, time
port, n, rcpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rnd = random.Random(42)
deadline = time.time() + 600
l = smtplib.LMTP("127.0.0.1", port)
for i in range(n):
    if time.time() > deadline:
        sys.exit("delivery took more than 600 s")
    size = rnd.randint(1024, 16384)
    body = []
    while sum(len(x) + 2 for x in body) < size:
        body.append("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(72)))
    msg = (f"From: Alice <alice@example.test>\r\nTo: Bob <{rcpt}>\r\n"
           f"Subject: bench message {i} " + "x" * rnd.randint(0, 40) + "\r\n"
           f"Date: Sat, 28 Nov 2026 00:00:00 +0000\r\n"
           f"Message-ID: <bench-{i}@example.test>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + "\r\n".join(body) + "\r\n")
    refused = l.sendmail("alice@example.test", [rcpt], msg)
    if refused:
        sys.exit(f"refused: {refused}")
l.quit()
EOF
stop_server
RM_HOME=$RM_MAIL/example.test/bob
count=$(find "$RM_HOME/Maildir/cur" "$RM_HOME/Maildir/new" -type f | wc -l)
echo "ringmail Maildir: $count messages in $RM_HOME/Maildir" >&2
[[ $count -eq $MESSAGES ]] || { echo "expected $MESSAGES messages" >&2; exit 1; }

# Dovecot's identical copy.
DC=$TMP/dovecot
mkdir -p "$DC/run" "$DC/state" "$DC/home"
cp -a "$RM_HOME" "$DC/home/bob"
chown -R nobody:nogroup "$DC/home"
DC_IMAPS=$(free_port)
echo "$USER_ADDR:{PLAIN}$PASSWORD:65534:65534::$DC/home/bob::" >"$DC/passwd"
chmod 644 "$DC/passwd"
cat >"$DC/dovecot.conf" <<EOF
protocols = imap
listen = 127.0.0.1
base_dir = $DC/run
state_dir = $DC/state
log_path = $DC/log
info_log_path = $DC/log
default_internal_user = dovecot
default_login_user = dovenull
ssl = required
ssl_cert = <$TMP/cert.pem
ssl_key = <$TMP/key.pem
auth_mechanisms = plain
passdb {
  driver = passwd-file
  args = $DC/passwd
}
userdb {
  driver = passwd-file
  args = $DC/passwd
}
mail_location = maildir:~/Maildir
default_process_limit = $LIMIT
default_client_limit = $((LIMIT * 3))
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $DC_IMAPS
    ssl = yes
  }
  process_limit = $LIMIT
}
service imap {
  process_limit = $LIMIT
}
protocol imap {
  mail_max_userip_connections = $LIMIT
}
EOF
start_dovecot() {
    dovecot -F -c "$DC/dovecot.conf" >>"$DC/stdout.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$DC_IMAPS"
}

start() { if [[ $1 == ringmail ]]; then start_ringmail; else start_dovecot; fi; }
port_of() { if [[ $1 == ringmail ]]; then echo "$RM_IMAPS"; else echo "$DC_IMAPS"; fi; }

summary() { # summary JSON KEY...: "key=value ..." for the progress lines
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(" ".join(k + "=" + str(d.get(k)) for k in sys.argv[2:]))' "$@"
}
RUNS=$OUT.jsonl
: >"$RUNS"
for ((round = 1; round <= REPEATS; round++)); do
    read -r -a order <<<"$CONTENDERS"
    if ((round % 2 == 0)); then
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do rev+=("${order[i]}"); done
        order=("${rev[@]}")
        unset rev
    fi
    for c in "${order[@]}"; do
        port=$(port_of "$c")
        common=(--target "127.0.0.1:$port" --user "$USER_ADDR" --password "$PASSWORD")
        if [[ " $MODES " == *" load "* ]]; then
            start "$c"
            timeout 60 "$BENCH" imap load "${common[@]}" --sessions "$SESSIONS" --duration 2s \
                --mix "$MIX" >/dev/null
            timeout 300 "$BENCH" imap load "${common[@]}" --pid "$SERVER_PID" --label "$c" \
                --sessions "$SESSIONS" --duration "$DURATION" --mix "$MIX" --seed "$round" \
                --json "$TMP/load.json"
            python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
                "$TMP/load.json" "$round" >>"$RUNS"
            echo "round $round $c load: $(summary "$TMP/load.json" ops_per_sec errors first_error)" >&2
            stop_server
        fi

        [[ " $MODES " == *" idle "* ]] || continue
        start "$c"
        sleep 1
        timeout 400 "$BENCH" imap idle "${common[@]}" --pid "$SERVER_PID" --label "$c" \
            --sessions "$IDLE_SESSIONS" --json "$TMP/idle.json"
        python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
            "$TMP/idle.json" "$round" >>"$RUNS"
        echo "round $round $c idle: $(summary "$TMP/idle.json" established rss_bytes_per_session pss_bytes_per_session alive_after first_error)" >&2
        stop_server
    done
done

IMAP_RATE="$IMAP_RATE" python3 - "$RUNS" "$OUT.md" "$REPEATS" "$MESSAGES" "$SESSIONS" "$DURATION" "$IDLE_SESSIONS" "$MIX" <<'EOF'
import json, os, platform, statistics, sys
runs_path, out, repeats, messages, sessions, duration, idle_n, mix = sys.argv[1:9]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
load = {c: [r for r in runs if r["test"] == "imap-load" and r["label"] == c] for c in ("ringmail", "dovecot")}
idle = {c: [r for r in runs if r["test"] == "imap-idle" and r["label"] == c] for c in ("ringmail", "dovecot")}
def mmm(xs, fmt="{:,.0f}"):
    xs = sorted(xs)
    return [fmt.format(xs[0]), fmt.format(statistics.median(xs)), fmt.format(xs[-1])] if xs else ["n/a"] * 3
def med(xs):
    return statistics.median(xs) if xs else float("nan")
L = [f"# IMAP: ringmail mda against Dovecot ({os.path.basename(out)[:-3]})", "",
     f"Machine: nproc={os.cpu_count()}, kernel {platform.release()}; repeats={repeats}; {messages} messages in INBOX; ringmail --imap-commands-per-second {os.environ.get('IMAP_RATE', 'default')}; "
     f"load: {sessions} sessions, {duration} per run, mix {mix}; idle: {idle_n} sessions in IDLE. TLS 1.3 (implicit), P-256 certificate.", "",
     "## Operation mix (ops/s over all operations)", "",
     "| server | ops/s min | median | max | vs dovecot (median) | errors | server CPU ms/op (median) |",
     "|---|---:|---:|---:|---:|---:|---:|"]
dmed = med([r["ops_per_sec"] for r in load["dovecot"]])
for c in ("ringmail", "dovecot"):
    rs = load[c]
    rates = [r["ops_per_sec"] for r in rs]
    cpu = [1000 * r["server_cpu_s"] / r["ops"] for r in rs if r.get("server_cpu_s") is not None and r["ops"]]
    ratio = f"{med(rates) / dmed:.2f}x" if c == "ringmail" and rs and dmed == dmed and dmed > 0 else "n/a"
    L.append(f"| {c} | " + " | ".join(mmm(rates)) + f" | {ratio} | {sum(r['errors'] for r in rs)} | {med(cpu):.3f} |")
L += ["", "## Per operation: ops/s and latency (median over runs of each run's p50 / p99, µs)", "",
      "| op | ringmail ops/s | dovecot ops/s | ratio | ringmail p50 | dovecot p50 | ringmail p99 | dovecot p99 |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
ops = sorted({k for rs in load.values() for r in rs for k in r["per_op"]})
for op in ops:
    def g(c, f):
        return med([r["per_op"][op][f] for r in load[c] if op in r["per_op"]])
    ro, do = g("ringmail", "ops_per_sec"), g("dovecot", "ops_per_sec")
    L.append(f"| {op} | {ro:,.0f} | {do:,.0f} | {ro / do:.2f}x | {g('ringmail', 'p50_us'):,.0f} | {g('dovecot', 'p50_us'):,.0f} | {g('ringmail', 'p99_us'):,.0f} | {g('dovecot', 'p99_us'):,.0f} |")
L += ["", f"## Memory per idle IDLE TLS session ({idle_n} sessions, whole server process tree, fresh server)", "",
      "| server | sessions idling (min) | alive after (min) | processes with all idle (median) | RSS KiB/session min | median | max | PSS KiB/session min | median | max |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for c in ("ringmail", "dovecot"):
    rs = idle[c]
    if not rs:
        continue
    rss = [r["rss_bytes_per_session"] / 1024 for r in rs if r["rss_bytes_per_session"] is not None]
    pss = [r["pss_bytes_per_session"] / 1024 for r in rs if r["pss_bytes_per_session"] is not None]
    procs = med([r["after"]["processes"] for r in rs if r.get("after")])
    L.append(f"| {c} | {min(r['established'] for r in rs)} | {min(r['alive_after'] for r in rs)} | {procs:.0f} | "
             + " | ".join(mmm(rss, "{:,.1f}")) + " | " + " | ".join(mmm(pss, "{:,.1f}")) + " |")
errs = [f"- {r['label']} {r['test']} round {r['round']}: {r['first_error']}" for r in runs if r.get("first_error")]
if errs:
    L += ["", "## Errors", ""] + errs
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
EOF
echo "wrote $OUT.md and $RUNS" >&2
