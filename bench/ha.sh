#!/usr/bin/env bash
# tokend's high-availability rows: several `tokend run` replicas sharing one PostgreSQL,
# against the fake provider, each row with its baseline measured in the same run.
#
#   HA1 failover: SIGKILL of the replica holding an account -> the first token for that
#       account committed by another replica (read from the store), p50/p99; <= lease_ttl + 2 s
#   HA2 propagation: a forced refresh committed on the holder -> each follower serves the
#       new token, p99; < 100 ms
#   HA3 provider calls: 3 replicas x N accounts vs 1 replica x N accounts; ratio <= 1.05
#   HA4 reads: a replica serving the accounts it follows vs the file-backed daemon;
#       ratio >= 0.95
#
#   bash bench/ha.sh             # full: 30 kills, 200 refreshes, 1,000 accounts for 180 s (~10 min)
#   bash bench/ha.sh --quick     # 5 kills, 30 refreshes, 200 accounts for 30 s (~2 min)
#
# Options:
#   --quick                 small counts and short durations
#   --no-build              use the binaries already in target/release
#   --no-install            do not install missing tools (wrk)
#   --out DIR               where logs and results go (default: target/bench/<timestamp>-ha-<mode>)
#   --strict                exit 1 when a target fails
#   --lease-ttl S           [state] lease_ttl of every replica, seconds (default 5)
#   --kills N               failover samples (full: 30, quick: 5)
#   --refreshes N           propagation samples (full: 200, quick: 30)
#   --calls-accounts N      accounts in the provider-calls test (full: 1000, quick: 200)
#   --calls-seconds N       its duration (full: 180, quick: 30)
#   --calls-lifetime N      its access-token lifetime, seconds (full: 60, quick: 10)
#
# PostgreSQL is Debian's package (initdb and pg_ctl, found on PATH or in
# /usr/lib/postgresql/*/bin), started here in a temp dir (owned by postgres when run as
# root) on a free 127.0.0.1 port, with its durable defaults: fsync and synchronous_commit
# on. Only the PostgreSQL backend is measured here. Everything listens on 127.0.0.1;
# every process started here is stopped by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

QUICK=0 BUILD=1 STRICT=0 INSTALL=1 OUT="" LEASE_TTL=5
KILLS="" REFRESHES="" CALLS_ACCOUNTS="" CALLS_SECONDS="" CALLS_LIFETIME=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --no-install) INSTALL=0 ;;
    --strict) STRICT=1 ;;
    --out) OUT=$2; shift ;;
    --lease-ttl) LEASE_TTL=$2; shift ;;
    --kills) KILLS=$2; shift ;;
    --refreshes) REFRESHES=$2; shift ;;
    --calls-accounts) CALLS_ACCOUNTS=$2; shift ;;
    --calls-seconds) CALLS_SECONDS=$2; shift ;;
    --calls-lifetime) CALLS_LIFETIME=$2; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  MODE=quick
  : "${KILLS:=5}" "${REFRESHES:=30}" "${CALLS_ACCOUNTS:=200}" "${CALLS_SECONDS:=30}" "${CALLS_LIFETIME:=10}"
  WRK_SECONDS=3 WRK_ROUNDS=1
else
  MODE=full
  : "${KILLS:=30}" "${REFRESHES:=200}" "${CALLS_ACCOUNTS:=1000}" "${CALLS_SECONDS:=180}" "${CALLS_LIFETIME:=60}"
  WRK_SECONDS=5 WRK_ROUNDS=3
fi
READ_ACCOUNTS=100
TTL_MS=$((LEASE_TTL * 1000))
# The failover test's tokens: short enough that a refresh is due when a new holder takes
# the lease (a refresh is planned at <= 0.8 x lifetime, the lease outlives its last
# renewal by >= 2/3 x lease_ttl), so the first commit after a kill is not a wait for
# the schedule.
FO_LIFETIME=$(( (LEASE_TTL + 1) / 2 ))

OUT=${OUT:-target/bench/$(date +%Y%m%d-%H%M%S)-ha-$MODE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
bench_init
declare -A RPID RADDR

# ---------------------------------------------------------------------------------------
# PostgreSQL of our own.
if [ "$(id -u)" = 0 ]; then AS_PG=(runuser -u postgres --); else AS_PG=(); fi
PG_DIR="" PG_PID="" PG_BIN=""
pg_bin() {
  local d
  if command -v initdb > /dev/null && command -v pg_ctl > /dev/null; then
    dirname "$(command -v initdb)"; return
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return; }
  done
  return 1
}
start_postgres() {
  PG_BIN=$(pg_bin) || { log "PostgreSQL's initdb/pg_ctl not found: install Debian's postgresql package (.ci/run does)"; exit 1; }
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tokend-bench-pg.XXXXXX")
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
  # --no-sync: initdb does not flush the new cluster's files (they are thrown away after
  # the run); the server below flushes every commit (fsync = on).
  timeout 120 "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth-local=trust \
    --auth-host=trust --no-sync --no-instructions -E UTF8 > "$OUT/postgres-initdb.log" 2>&1 \
    || { log "initdb failed (see $OUT/postgres-initdb.log)"; exit 1; }
  local port
  for _ in 1 2 3; do
    port=$("$EX/bench_client" free-port)
    if timeout 60 "${AS_PG[@]}" "$PG_BIN/pg_ctl" start -w -t 30 -D "$PG_DIR/data" -l "$PG_DIR/server.log" \
      -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=100" > /dev/null 2>&1; then
      PG_PID=$(head -1 "$PG_DIR/data/postmaster.pid")
      PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
      PG_PORT=$port
      return 0
    fi
  done
  log "PostgreSQL did not start:"; tail -20 "$PG_DIR/server.log" >&2; exit 1
}
cleanup_last() {
  [ -n "$PG_DIR" ] || return 0
  if [ -n "$PG_PID" ] && kill -0 "$PG_PID" 2>/dev/null; then
    timeout 40 "${AS_PG[@]}" "$PG_BIN/pg_ctl" stop -w -t 30 -m fast -D "$PG_DIR/data" > /dev/null 2>&1 \
      || kill -9 "$PG_PID" 2>/dev/null || true
  fi
  cp "$PG_DIR/server.log" "$OUT/postgres.log" 2>/dev/null || true
  rm -rf "$PG_DIR"
}
pg_setting() { psql "$PG_URL" -Atc "SHOW $1" 2>/dev/null || echo unknown; }

# ---------------------------------------------------------------------------------------
# Replicas: tokend run with [state] on the shared PostgreSQL.

# replica_config KEY NODE PREFIX: $OUT/KEY/NODE.toml from the fake provider's config for
# KEY: its own loopback port and state dir, [state] backend postgres with table PREFIX.
replica_config() {
  local key=$1 node=$2 prefix=$3 dir=$OUT/$1 port
  port=$("$EX/bench_client" free-port)
  mkdir -p -m 700 "$dir/$node-state"
  (umask 077; sed -e "s|^listen = .*|listen = [\"127.0.0.1:$port\"]|" \
    -e "s|^dir = .*|dir = \"$dir/$node-state\"\nbackend = \"postgres\"\nurl = \"$PG_URL\"\nprefix = \"$prefix\"\nlease_ttl = \"${LEASE_TTL}s\"\nnode_id = \"$node\"|" \
    "$dir/tokend.toml" > "$dir/$node.toml")
  RADDR[$key/$node]=127.0.0.1:$port
}
# start_replica KEY NODE [pinned]: tokend run on $OUT/KEY/NODE.toml (on CPU 0 when a
# third argument is given); its pid in RPID[KEY/NODE]. Appends to NODE.log.
start_replica() {
  local key=$1 node=$2 cpu=${3:-} dir=$OUT/$1
  if [ -n "$cpu" ]; then
    RUST_LOG=info "${ON_CPU0[@]}" "$TOKEND" run --config "$dir/$node.toml" 2>> "$dir/$node.log" &
  else
    RUST_LOG=info "$TOKEND" run --config "$dir/$node.toml" 2>> "$dir/$node.log" &
  fi
  RPID[$key/$node]=$!
  PIDS+=("$!")
  # The failover test SIGKILLs replicas: no "Killed" job notice from this shell for them.
  disown "$!"
}
# cluster KEY PREFIX NODE...: a replica per NODE on KEY's provider config; waits until
# each answers /readyz (every account has a token).
cluster() {
  local key=$1 prefix=$2 node; shift 2
  for node in "$@"; do replica_config "$key" "$node" "$prefix"; start_replica "$key" "$node"; done
  for node in "$@"; do
    await_ready "http://${RADDR[$key/$node]}" "${RPID[$key/$node]}" "$key/$node" "$OUT/$key/$node.log"
  done
}
stop_cluster() {
  local key=$1 node; shift
  for node in "$@"; do stop "${RPID[$key/$node]}"; done
}
# pcts FILE: "p50 p99 min max" (nearest rank) of the numbers in FILE, one per line
pcts() {
  sort -n "$1" | awk '{ a[NR] = $1 } END {
    r50 = int((NR * 50 + 99) / 100); r99 = int((NR * 99 + 99) / 100)
    printf "%s %s %s %s\n", a[r50 < 1 ? 1 : r50], a[r99 < 1 ? 1 : r99], a[1], a[NR] }'
}

# ---------------------------------------------------------------------------------------
log "mode: $MODE (high availability, PostgreSQL); output in $OUT"
install_tools
build_binaries
start_postgres
machine_info "ha: lease_ttl=${LEASE_TTL}s kills=$KILLS refreshes=$REFRESHES calls: accounts=$CALLS_ACCOUNTS lifetime=${CALLS_LIFETIME}s duration=${CALLS_SECONDS}s" \
  "postgres=$("$PG_BIN/postgres" --version 2>/dev/null || echo unknown) on 127.0.0.1:$PG_PORT" \
  "postgres_settings: fsync=$(pg_setting fsync) synchronous_commit=$(pg_setting synchronous_commit) wal_sync_method=$(pg_setting wal_sync_method)"
log "PostgreSQL on 127.0.0.1:$PG_PORT ($(get postgres_settings "$OUT/machine.txt"))"

# ---------------------------------------------------------------------------------------
# HA4. Reads: a replica serving the accounts it follows vs the file-backed daemon.
log "HA4. reads: $READ_ACCOUNTS accounts, 1 h tokens; a replica of 3 (its followed accounts) vs the file-backed daemon; servers on CPU 0, load on CPU 1"
quiet
foreign_mark
provider filed --accounts "$READ_ACCOUNTS" --lifetime 3600 --grant refresh_token
daemon filed 0
FILED_ADDR=$(hostport "$filed_daemon")
# The same provider settings for the replicas; min_interval 0 lets HA2 force refreshes
# back to back.
provider prop --accounts "$READ_ACCOUNTS" --lifetime 3600 --grant refresh_token --refresh-extra 'min_interval = "0s"'
replica_config prop r1 prop_; start_replica prop r1 pinned
cluster prop prop_ r2 r3
await_ready "http://${RADDR[prop/r1]}" "${RPID[prop/r1]}" prop/r1 "$OUT/prop/r1.log"
# Leases spread to an equal share within a few seconds of the last replica's start.
SHARE=$(( (READ_ACCOUNTS + 2) / 3 ))
for _ in $(seq 120); do
  timeout 10 "$EX/bench_client" ha-accounts --addr "${RADDR[prop/r1]}" > "$OUT/prop/r1-accounts.txt"
  held=$(get held "$OUT/prop/r1-accounts.txt" | tr ',' '\n' | grep -c . || true)
  [ "$held" -le "$SHARE" ] && break
  sleep 0.5
done
FOLLOWED=$(get followed "$OUT/prop/r1-accounts.txt")
N_FOLLOWED=$(echo "$FOLLOWED" | tr ',' '\n' | grep -c . || true)
log "  r1 holds $held accounts and follows $N_FOLLOWED; both servers are read on those $N_FOLLOWED"
R_ALL="" F_ALL="" RC_ALL="" FC_ALL=""
for r in $(seq "$WRK_ROUNDS"); do
  read -r f fc < <(throughput "$FILED_ADDR" "file-$r" "$filed_DPID" "$OUT/prop" "$READ_ACCOUNTS" "$FOLLOWED")
  read -r t tc < <(throughput "${RADDR[prop/r1]}" "replica-$r" "${RPID[prop/r1]}" "$OUT/prop" "$READ_ACCOUNTS" "$FOLLOWED")
  log "  round $r: file-backed $f req/s ($fc us CPU/req), replica $t req/s ($tc us CPU/req)"
  F_ALL="$F_ALL $f" R_ALL="$R_ALL $t" FC_ALL="$FC_ALL $fc" RC_ALL="$RC_ALL $tc"
done
OTHER=$(foreign_since)%
row "HA4 follower read throughput (req/s, median of $WRK_ROUNDS)" "$(echo "$R_ALL" | median)" "$(echo "$F_ALL" | median)" ">=ratio" 0.95 "req/s" \
  "baseline: the file-backed daemon (same provider settings, $READ_ACCOUNTS accounts). Measured: replica r1 of 3 on PostgreSQL, reading only the $N_FOLLOWED accounts it follows (both servers read the same ones); $LOADGEN; servers on CPU 0, load on CPU 1; rounds (file/replica):$F_ALL /$R_ALL"
row "HA4' follower read CPU per request (server utime+stime)" "$(echo "$RC_ALL" | median)" "$(echo "$FC_ALL" | median)" "<=ratio" 1.05 "us" \
  "the same runs; ratio <= 1/0.95 is the throughput target restated per request, robust to other load; rounds (file/replica):$FC_ALL /$RC_ALL"
stop "$filed_DPID"; stop "$filed_PID"

# ---------------------------------------------------------------------------------------
# HA2. Propagation on the same three replicas.
log "HA2. propagation: $REFRESHES forced refreshes of acct-00000 on its holder; time until both followers serve each new token"
quiet
foreign_mark
timeout $((REFRESHES * 12 + 120)) "$EX/bench_client" ha-propagation \
  --replicas "${RADDR[prop/r1]},${RADDR[prop/r2]},${RADDR[prop/r3]}" --account acct-00000 \
  --count "$REFRESHES" --timeout 5 > "$OUT/prop/propagation.txt" 2> "$OUT/prop/propagation.err" || true
OTHER=$(foreign_since)%
pp() { get "$1" "$OUT/prop/propagation.txt"; }
ms() { [ -n "$1" ] && calc "sprintf(\"%.3f\", $1 / 1000)"; }
row "HA2 propagation: holder's commit -> served by each follower, p99" "$(ms "$(pp p99_us)")" "$(ms "$(pp refresh_p99_us)")" "<" 100 ms \
  "$(pp samples) follower observations ($REFRESHES POST /v1/accounts/acct-00000/refresh on the holder x 2 followers, each polled every ~1 ms), failures $(pp failures), wrong token $(pp mismatched); timed from the holder's answer, which it sends only after the fenced commit: p50 $(ms "$(pp p50_us)") ms, max $(ms "$(pp max_us)") ms, $(pp before_answer) seen before the answer arrived; from the request: p50 $(ms "$(pp request_p50_us)") ms, p99 $(ms "$(pp request_p99_us)") ms. Baseline: the holder's own forced refresh (request -> answer: in-flight mark committed, provider call, token committed), p99; p50 $(ms "$(pp refresh_p50_us)") ms"
stop_cluster prop r1 r2 r3; stop "$prop_PID"

# ---------------------------------------------------------------------------------------
# HA3. Provider calls: three replicas vs one, side by side, same settings.
log "HA3. provider calls: $CALLS_ACCOUNTS accounts, ${CALLS_LIFETIME}s tokens, ${CALLS_SECONDS}s: 3 replicas vs 1 replica, side by side"
foreign_mark
provider one --accounts "$CALLS_ACCOUNTS" --lifetime "$CALLS_LIFETIME" --grant refresh_token
provider three --accounts "$CALLS_ACCOUNTS" --lifetime "$CALLS_LIFETIME" --grant refresh_token
replica_config one r1 one_
for n in r1 r2 r3; do replica_config three "$n" three_; done
CALLS_START=$SECONDS
start_replica one r1
for n in r1 r2 r3; do start_replica three "$n"; done
sleep "$CALLS_SECONDS"
CALLS_WALL=$((SECONDS - CALLS_START))
curl -s "$one_control/stats" > "$OUT/one/provider-stats.json"
curl -s "$three_control/stats" > "$OUT/three/provider-stats.json"
for n in r1 r2 r3; do
  timeout 10 "$EX/bench_client" ha-accounts --addr "${RADDR[three/$n]}" > "$OUT/three/$n-accounts.txt" || true
done
OTHER=$(foreign_since)%
stat_of() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" "$OUT/$2/provider-stats.json"; }
held_by() { get held "$OUT/three/$1-accounts.txt" | tr ',' '\n' | grep -c . || true; }
row "HA3 provider calls: 3 replicas vs 1 (token requests, ${CALLS_SECONDS}s)" "$(stat_of recorded_requests three)" "$(stat_of recorded_requests one)" "<=ratio" 1.05 "requests" \
  "$CALLS_ACCOUNTS refresh_token accounts, ${CALLS_LIFETIME}s tokens, both sets on the same PostgreSQL (table prefixes one_ / three_), each with its own fake provider, started together and counted after ${CALLS_WALL}s from the start (cold start included). Refused: $(stat_of rejected three) (3 replicas) / $(stat_of rejected one) (1 replica); leases at the end: r1 $(held_by r1), r2 $(held_by r2), r3 $(held_by r3)"
stop_cluster three r1 r2 r3; stop_cluster one r1; stop "$one_PID"; stop "$three_PID"

# ---------------------------------------------------------------------------------------
# HA1. Failover: SIGKILL the holder of an account, restart it, again.
log "HA1. failover: $KILLS SIGKILLs of a lease holder; lease_ttl ${LEASE_TTL}s, ${FO_LIFETIME}s tokens"
quiet
foreign_mark
provider fo --accounts 3 --lifetime "$FO_LIFETIME" --grant refresh_token --refresh-extra 'min_interval = "0s"'
cluster fo fo_ r1 r2 r3
: > "$OUT/fo/failover_ms.txt"; : > "$OUT/fo/lease_left_ms.txt"
FO_TIMEOUT=$((LEASE_TTL * 3 + 10)) FO_TIMEOUTS=0 FO_POLLED=0
for i in $(seq "$KILLS"); do
  account=$(printf 'acct-%05d' $(( (i - 1) % 3 )))
  nodes="r1=${RPID[fo/r1]},r2=${RPID[fo/r2]},r3=${RPID[fo/r3]}"
  out=$OUT/fo/kill-$i.txt
  timeout $((FO_TIMEOUT + 90)) "$EX/bench_client" ha-failover --pg "$PG_URL" --prefix fo_ \
    --account "$account" --nodes "$nodes" --timeout "$FO_TIMEOUT" > "$out" 2>&1 || true
  killed=$(get killed "$out")
  [ -n "$killed" ] || { log "  kill $i: no holder to kill ($(get failover_ms "$out"))"; continue; }
  forget "${RPID[fo/$killed]}"
  took=$(get failover_ms "$out")
  if [[ "$took" =~ ^[0-9.]+$ ]]; then
    echo "$took" >> "$OUT/fo/failover_ms.txt"
  else
    FO_TIMEOUTS=$((FO_TIMEOUTS + 1)); echo "$((FO_TIMEOUT * 1000))" >> "$OUT/fo/failover_ms.txt"
  fi
  get lease_left_ms "$out" >> "$OUT/fo/lease_left_ms.txt"
  [ "$(get detected "$out")" = poll ] && FO_POLLED=$((FO_POLLED + 1))
  log "  kill $i: $account held by $killed (lease left $(get lease_left_ms "$out") ms): $took ms, new holder $(get new_holder "$out")"
  # Three replicas again before the next kill, which comes at a random point of the
  # lease renewal cycle.
  start_replica fo "$killed"
  await_ready "http://${RADDR[fo/$killed]}" "${RPID[fo/$killed]}" "fo/$killed" "$OUT/fo/$killed.log" /healthz
  sleep "$(calc "sprintf(\"%.3f\", 1 + $RANDOM / 32768 * $LEASE_TTL / 3)")"
done
OTHER=$(foreign_since)%
N_FO=$(grep -c . "$OUT/fo/failover_ms.txt" || true)
if [ "$N_FO" -gt 0 ]; then
  read -r FO_P50 FO_P99 FO_MIN FO_MAX < <(pcts "$OUT/fo/failover_ms.txt")
  read -r LL_P50 _ LL_MIN LL_MAX < <(pcts "$OUT/fo/lease_left_ms.txt")
else
  FO_P50=- FO_P99=- FO_MIN=- FO_MAX=- LL_P50=- LL_MIN=- LL_MAX=-
fi
FO_NOTE="$N_FO kills (accounts acct-00000..2 in turn, 3 replicas, each killed one restarted before the next kill); timeouts (counted as ${FO_TIMEOUT} s) $FO_TIMEOUTS; min $FO_MIN ms, max $FO_MAX ms. Timed from kill(2) to the arrival of PostgreSQL's NOTIFY of the first record write with a new lease epoch, another holder and a new access token (LISTEN; $FO_POLLED of them seen by the 100 ms fallback poll instead). The killed holder's lease had p50 $LL_P50 ms left (min $LL_MIN, max $LL_MAX) by the database's clock. Tokens live ${FO_LIFETIME}s, so a refresh is due when the lease is taken. Baseline: lease_ttl"
row "HA1a failover: SIGKILL of the holder -> first token committed by another replica, p50" "$FO_P50" "$TTL_MS" "<=" "$((TTL_MS + 2000))" ms "$FO_NOTE"
row "HA1b failover: SIGKILL of the holder -> first token committed by another replica, p99" "$FO_P99" "$TTL_MS" "<=" "$((TTL_MS + 2000))" ms "the same $N_FO kills"
stop_cluster fo r1 r2 r3; stop "$fo_PID"

finish
