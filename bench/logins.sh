#!/usr/bin/env bash
# Logins per second for each account backend, side by side in one run: SQLite (embedded),
# PostgreSQL (a private cluster on loopback) and LDAP (a private OpenLDAP slapd on loopback,
# StartTLS, service bind; an uncached login is a search plus a bind as the user, and slapd
# verifies the user's {SSHA} password), with the cache off (every login reaches the store:
# what a flood of distinct logins costs) and on (a returning user within the cache TTL). The
# SQL stores hold argon2id hashes (ringmail's default for new passwords). Root is needed for
# the PostgreSQL cluster (runs as `postgres`); slapd is skipped when not installed.
#
#   REPEATS=3 DURATION=5s CONCURRENCY=8 bash bench/logins.sh
#
# Output: bench/out/logins-<timestamp>.md with min/median/max per backend and mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5s}
CONCURRENCY=${CONCURRENCY:-8}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
RINGMAIL=${RINGMAIL:-target/release/ringmail}
BENCH=${BENCH:-target/release/ringmail-bench}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=bench/out/logins-$STAMP
mkdir -p bench/out
TMP=$(mktemp -d -t ringmail-logins.XXXXXX)
chmod 755 "$TMP"
PG_DATA=""
SLAPD_PID=""

cleanup() {
    if [[ -n $SLAPD_PID ]]; then
        kill "$SLAPD_PID" 2>/dev/null
        wait "$SLAPD_PID" 2>/dev/null
    fi
    if [[ -n $PG_DATA ]]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" stop -m immediate -w -t 20 -D "$PG_DATA" >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

[[ -x $RINGMAIL && -x $BENCH ]] || cargo build --release -p ringmail -p ringmail-bench
USER_ADDR=bench@bench.test
PASSWORD=bench-password-1

seed() { # seed DB_URL
    "$RINGMAIL" accounts --db "$1" domain add bench.test >/dev/null
    echo "$PASSWORD" | "$RINGMAIL" accounts --db "$1" add "$USER_ADDR" --password-stdin >/dev/null
}

declare -A URL
URL[sqlite]="sqlite:$TMP/accounts.db"
seed "${URL[sqlite]}"

if [[ $(id -u) -eq 0 && -x $PG_BIN/initdb ]]; then
    PGDIR="$TMP/pg"
    mkdir -p "$PGDIR" && chown postgres:postgres "$PGDIR"
    PG_DATA="$PGDIR/data"
    runuser -u postgres -- "$PG_BIN/initdb" -A trust -U postgres -E UTF8 --no-sync -D "$PG_DATA" >/dev/null
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    runuser -u postgres -- "$PG_BIN/pg_ctl" start -w -t 30 -D "$PG_DATA" -l "$PGDIR/log" \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR" >/dev/null
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE USER ringmail PASSWORD 'ringmail-bench'" -c "CREATE DATABASE ringmail OWNER ringmail"
    URL[postgres]="postgres://ringmail:ringmail-bench@127.0.0.1:$PORT/ringmail"
    seed "${URL[postgres]}"
else
    echo "postgres: skipped (needs root and $PG_BIN/initdb)" >&2
fi

SCHEMA=/etc/ldap/schema
if [[ -x /usr/sbin/slapd && -x /usr/sbin/slapadd && -x /usr/sbin/slaptest && -d $SCHEMA ]]; then
    L="$TMP/ldap"
    BASE=dc=bench,dc=test
    SVC_DN=cn=ringmail,$BASE
    SVC_PW=service-secret
    mkdir -p "$L/db" "$L/slapd.d"
    # A CA and a server certificate for 127.0.0.1 (StartTLS is verified against the CA).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
        -keyout "$L/ca.key" -out "$L/ca.pem" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout "$L/key.pem" -out "$L/req.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$L/ext"
    openssl x509 -req -in "$L/req.csr" -CA "$L/ca.pem" -CAkey "$L/ca.key" -CAcreateserial -days 2 \
        -extfile "$L/ext" -out "$L/cert.pem" 2>/dev/null
    cat >"$L/slapd.conf" <<CONF
include $SCHEMA/core.schema
include $SCHEMA/cosine.schema
include $SCHEMA/nis.schema
include $SCHEMA/inetorgperson.schema
pidfile $L/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCertificateFile $L/cert.pem
TLSCertificateKeyFile $L/key.pem
TLSCACertificateFile $L/ca.pem
database mdb
suffix "$BASE"
directory $L/db
maxsize 67108864
index mail eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
CONF
    cat >"$L/data.ldif" <<LDIF
dn: $BASE
objectClass: dcObject
objectClass: organization
o: Bench
dc: bench

dn: $SVC_DN
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: ringmail
userPassword: $(/usr/sbin/slappasswd -h '{SSHA}' -s "$SVC_PW")

dn: uid=bench,$BASE
objectClass: inetOrgPerson
uid: bench
cn: bench
sn: bench
mail: $USER_ADDR
userPassword: $(/usr/sbin/slappasswd -h '{SSHA}' -s "$PASSWORD")
LDIF
    /usr/sbin/slapadd -q -f "$L/slapd.conf" -b "$BASE" -l "$L/data.ldif"
    /usr/sbin/slaptest -Q -f "$L/slapd.conf" -F "$L/slapd.d"
    LPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    # -d keeps slapd in the foreground: our child, stopped by cleanup.
    /usr/sbin/slapd -F "$L/slapd.d" -h "ldap://127.0.0.1:$LPORT/" -d 0 >"$L/log" 2>&1 &
    SLAPD_PID=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$LPORT") 2>/dev/null && break; sleep 0.1; done
    URL[ldap]="ldap://127.0.0.1:$LPORT/?base=$BASE&starttls=true&ca_file=$L/ca.pem&bind_dn=$SVC_DN&bind_password=$SVC_PW&user_filter=(%26(objectClass=inetOrgPerson)(mail={address}))&domains=bench.test"
else
    echo "ldap: skipped (slapd not installed)" >&2
fi

results=()
for ((round = 1; round <= REPEATS; round++)); do
    for store in "${!URL[@]}"; do
        for mode in uncached cached; do
            flag=()
            [[ $mode == cached ]] && flag=(--cached)
            line=$("$BENCH" logins --db "${URL[$store]}" --user "$USER_ADDR" --password "$PASSWORD" \
                --concurrency "$CONCURRENCY" --duration "$DURATION" "${flag[@]}")
            echo "round $round $store $mode: $line" >&2
            results+=("$store $mode $line")
        done
    done
done

python3 - "$OUT.md" "$REPEATS" "$DURATION" "$CONCURRENCY" "${results[@]}" <<'EOF'
import json, statistics, sys, platform, os
out, repeats, duration, conc = sys.argv[1:5]
rows = {}
for r in sys.argv[5:]:
    store, mode, js = r.split(" ", 2)
    d = json.loads(js)
    rows.setdefault((store, mode), []).append(d)
lines = [f"# Logins per second ({os.path.basename(out)[:-3]})", "",
         f"Machine: nproc={os.cpu_count()}, kernel {platform.release()}; repeats={repeats}, duration={duration}, concurrency={conc}; SQL stores: argon2id m=19456 KiB t=2 p=1; LDAP: search + bind, slapd verifies {{SSHA}}; load average at the end {os.getloadavg()[0]:.1f}.", "",
         "| store | cache | logins/s min | median | max | p50 µs (median run) | p99 µs (median run) |",
         "|---|---|---:|---:|---:|---:|---:|"]
for (store, mode), ds in sorted(rows.items()):
    rates = sorted(d["logins_per_sec"] for d in ds)
    med = sorted(ds, key=lambda d: d["logins_per_sec"])[len(ds)//2]
    lines.append(f"| {store} | {mode} | {rates[0]:,.0f} | {statistics.median(rates):,.0f} | {rates[-1]:,.0f} | {med['p50_us']} | {med['p99_us']} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $OUT.md" >&2
