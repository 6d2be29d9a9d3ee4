#!/usr/bin/env bash
# Boots a Debian bookworm root with a real systemd as PID 1 (systemd-nspawn, host network)
# with deploy/tokend.service installed, and checks the daemon's systemd contract:
#   - Type=notify start: the unit only becomes active on READY=1, and a token is served;
#   - the sandbox really applies (dynamic uid, private user namespace, seccomp, no caps);
#   - watchdog pings arrive (the unit outlives WatchdogSec= without a restart);
#   - `systemctl reload` re-reads the config (a new account serves tokens);
#   - `systemctl stop` is clean (exit status 0, no SIGKILL);
#   - a broken config fails the unit with 78 and no restart loop.
# The OAuth provider is `tokend demo` on the host's 127.0.0.1, reached through the shared
# network; the client secret travels through LoadCredential=.
#
# Usage: bash deploy/ci/nspawn-test.sh    (as root; installs mmdebstrap and
#        systemd-container with apt-get when missing). TOKEND_BIN=path skips the build.
# The root tarball is cached in target/nspawn-cache/ (delete it to rebuild).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
. deploy/ci/lib.sh
ci_init nspawn-test
[ "$(id -u)" -eq 0 ] || fail "needs root (systemd-nspawn, mmdebstrap)"

# ---- tools ---------------------------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v nsenter >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
apt_install "${need[@]}"

# ---- the binary ----------------------------------------------------------------------
if [ -n "${TOKEND_BIN:-}" ]; then
  BIN=$(realpath "$TOKEND_BIN")
else
  log "cargo build --release --locked"
  t=$SECONDS
  timeout 1200 cargo build --release --locked --quiet
  log "build took $((SECONDS - t))s"
  BIN=$REPO/target/release/tokend
fi
[ -x "$BIN" ] || fail "no binary at $BIN"
TEST_START=$SECONDS

# ---- the root tarball (cached) -------------------------------------------------------
# ca-certificates: the HTTP client will not start without a CA bundle, even for http://.
PACKAGES=systemd,systemd-sysv,dbus,procps,libnss-systemd,ca-certificates
CACHE=$REPO/target/nspawn-cache
TARBALL=$CACHE/bookworm-$(echo "$PACKAGES" | sha256sum | cut -c1-12).tar
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
  log "mmdebstrap bookworm ($PACKAGES) -> $TARBALL"
  t=$SECONDS
  timeout 600 mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --format=tar bookworm "$TARBALL.part"
  mv "$TARBALL.part" "$TARBALL"
  log "mmdebstrap took $((SECONDS - t))s"
else
  log "cached root: $TARBALL"
fi

# ---- clean-up, whatever happens ------------------------------------------------------
WORK=$(mktemp -d "$REPO/target/nspawn-test.XXXXXX")
ROOT=$WORK/root
NSPAWN_PID=
DEMO_PID=
LEADER=
cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -n "$LEADER" ]; then
    echo "---- systemctl status tokend; journalctl -u tokend (last 40 lines) ----"
    IN systemctl status --no-pager tokend
    IN journalctl -u tokend --no-pager -n 40
  fi
  # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: a clean poweroff.
  stop_pid "$NSPAWN_PID" 30
  stop_pid "$DEMO_PID" 10
  if [ "$rc" -ne 0 ]; then
    echo "---- container console (last 40 lines) ----"
    tail -n 40 "$WORK/nspawn.log" 2>/dev/null
    echo "---- tokend demo stderr (last 10 lines) ----"
    tail -n 10 "$WORK/demo.err" 2>/dev/null
  fi
  rm -rf --one-file-system "$WORK"
  log "total $((SECONDS - START))s (after the build: $((SECONDS - TEST_START))s); exit $rc"
}
trap cleanup EXIT

# ---- the provider: tokend demo on the host -------------------------------------------
start_demo "$BIN" "$WORK"

# ---- the root: the unit as shipped, plus a test drop-in for the credential ------------
mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$TARBALL"
echo tokend-ci >"$ROOT/etc/hostname"
install -m 0755 "$BIN" "$ROOT/usr/bin/tokend"
install -m 0644 deploy/tokend.service "$ROOT/etc/systemd/system/tokend.service"
ln -sf /etc/systemd/system/tokend.service "$ROOT/etc/systemd/system/multi-user.target.wants/tokend.service"
install -d -m 0755 "$ROOT/etc/systemd/system/tokend.service.d"
cat >"$ROOT/etc/systemd/system/tokend.service.d/credentials.conf" <<'EOF'
[Service]
LoadCredential=demo-service-secret:/etc/credstore/tokend/demo-service-secret
EOF
install -d -m 0700 "$ROOT/etc/credstore" "$ROOT/etc/credstore/tokend"
(umask 077 && echo demo-service-secret >"$ROOT/etc/credstore/tokend/demo-service-secret")
PORT=$(free_port) || fail "no free port"
ENDPOINT=http://127.0.0.1:$PORT
# write_config ACCOUNT...: replaces the container's config in one rename.
write_config() {
  demo_config "$PORT" "$@" >"$ROOT/etc/tokend/tokend.toml.new"
  chmod 0644 "$ROOT/etc/tokend/tokend.toml.new"
  mv "$ROOT/etc/tokend/tokend.toml.new" "$ROOT/etc/tokend/tokend.toml"
}
install -d -m 0755 "$ROOT/etc/tokend"
write_config svc

# ---- boot ----------------------------------------------------------------------------
log "booting the container (systemd-nspawn --boot, host network, tokend on $ENDPOINT)"
systemd-nspawn --boot --register=no --keep-unit --machine=tokend-ci --console=read-only \
  -D "$ROOT" >"$WORK/nspawn.log" 2>&1 </dev/null &
NSPAWN_PID=$!
# The container's PID 1 is the child of systemd-nspawn that runs systemd.
leader() {
  LEADER=$(ps -o pid=,comm= --ppid "$NSPAWN_PID" | awk '$2 == "systemd" { print $1; exit }')
  [ -n "$LEADER" ]
}
wait_for 30 leader || fail "no systemd in the container"
# Commands inside the container: its mount, PID, UTS and IPC namespaces (the network
# is shared). As root there, systemctl talks to systemd's private socket.
IN() { timeout 60 nsenter --target "$LEADER" --mount --uts --ipc --pid -- "$@"; }
booted() { IN systemctl is-system-running 2>/dev/null | grep -Eq '^(running|degraded)$'; }
wait_for 60 booted || fail "the container did not finish booting"
log "container booted (leader pid $LEADER): $(IN systemctl is-system-running 2>/dev/null || true)"
prop() { IN systemctl show tokend -P "$1"; }
# The unit's journal, captured whole (a `journal | grep -q` would die of SIGPIPE under
# pipefail).
journal() { IN journalctl -u tokend --no-pager -o cat; }
journal_has() {
  local j
  j=$(journal)
  grep -Eq -- "$1" <<<"$j"
}
# systemd's time spans ("30s", "1min 30s", "100ms") in whole seconds.
span_sec() {
  local v=$1 s=0
  [[ $v =~ ([0-9]+)min ]] && s=$((BASH_REMATCH[1] * 60))
  [[ $v =~ (^|[^0-9])([0-9]+)s$ ]] && s=$((s + BASH_REMATCH[2]))
  echo "$s"
}

# ---- 1. start: READY=1 ---------------------------------------------------------------
not_activating() { [ "$(prop ActiveState)" != activating ]; }
wait_for 60 not_activating || fail "tokend still activating after 60 s"
[ "$(prop ActiveState)/$(prop SubState)" = active/running ] ||
  fail "tokend is $(prop ActiveState)/$(prop SubState): $(journal | tail -n 20)"
status=$(prop StatusText)
log "1. active/running after READY=1; STATUS=\"$status\""
[[ $status == "1 accounts: 1 ok" ]] || fail "unexpected STATUS= \"$status\""
MAIN_PID=$(prop MainPID)
READY_AT=$SECONDS
token=$("$BIN" token svc --endpoint "$ENDPOINT") || fail "no token for svc"
[ -n "$token" ] || fail "empty token"
log "   token served on the host's loopback: ${token:0:8}… ($(echo -n "$token" | wc -c) bytes)"
"$BIN" health --endpoint "$ENDPOINT" >/dev/null || fail "tokend health is not 0"
body=$(curl -fsS -H 'Tokend-Request: 1' "$ENDPOINT/v1/token/svc") || fail "curl got no token"
grep -q '"access_token"' <<<"$body" || fail "curl got no token: $body"

# ---- 2. the sandbox is in force -------------------------------------------------------
st=$(IN cat "/proc/$MAIN_PID/status")
uid=$(awk '/^Uid:/ { print $2 }' <<<"$st")
[ "$uid" -ne 0 ] || fail "runs as root"
grep -Eq '^NoNewPrivs:[[:space:]]+1$' <<<"$st" || fail "NoNewPrivs is not set"
grep -Eq '^Seccomp:[[:space:]]+2$' <<<"$st" || fail "no seccomp filter"
grep -Eq '^CapEff:[[:space:]]+0+$' <<<"$st" || fail "has effective capabilities"
grep -Eq '^CapBnd:[[:space:]]+0+$' <<<"$st" || fail "has a capability bounding set"
maps=$(IN cat "/proc/$MAIN_PID/uid_map" | wc -l)
[ "$maps" -eq 2 ] || fail "PrivateUsers=: uid_map has $maps lines, expected 2 (root and self)"
state=$(IN stat -c '%a %u %n' /var/lib/private/tokend/svc.json) || fail "no state file"
[[ $state == "600 $uid "* ]] || fail "state file: $state"
log "2. sandbox: uid $uid (dynamic), private user namespace, seccomp, no capabilities; state file $state"

# ---- 3. logs fit the journal ----------------------------------------------------------
if journal_has $'\e\['; then fail "ANSI escapes in the journal"; fi
if journal_has '^[0-9]{4}-[0-9]{2}-[0-9]{2}T'; then fail "timestamps in the journal lines"; fi
if journal_has '^<[0-7]>'; then fail "priority prefixes left in the journal messages"; fi
# Priorities: journald took each line's <N> prefix as its severity.
warnings=$(IN journalctl -u tokend --no-pager -o cat -p warning)
if grep -Eq 'INFO ' <<<"$warnings"; then fail "INFO lines at warning priority: $warnings"; fi
infos=$(IN journalctl -u tokend --no-pager -o cat -p info)
grep -Eq 'INFO .*ready' <<<"$infos" || fail "no INFO ready line at info priority"
log "3. journal lines have no ANSI colours, no second timestamp, and their own priorities"

# ---- 4. reload: a new account serves tokens -------------------------------------------
write_config svc svc2
IN systemctl reload tokend || fail "systemctl reload failed"
wait_for 20 journal_has 'config reloaded added=svc2 ' || fail "no 'config reloaded added=svc2' in the journal"
wait_for 20 "$BIN" token svc2 --endpoint "$ENDPOINT" >/dev/null || fail "no token for svc2 after reload"
journal_has 'Reloaded tokend.service' || fail "systemd did not log the reload as done"
[ "$(prop MainPID)" = "$MAIN_PID" ] || fail "the main PID changed on reload"
[ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "not running after reload"
"$BIN" token svc --endpoint "$ENDPOINT" >/dev/null || fail "svc lost its token on reload"
log "4. systemctl reload: same PID $MAIN_PID, svc2 added and served, svc still served"

# ---- 5. watchdog: outlive WatchdogSec= (30 s) with pings -------------------------------
wd_sec=$(span_sec "$(prop WatchdogUSec)")
[ "$wd_sec" -gt 0 ] || fail "no WatchdogSec= on the unit"
pings=0
last=$(prop WatchdogTimestampMonotonic)
until [ $((SECONDS - READY_AT)) -gt $((wd_sec + 5)) ] && [ "$pings" -ge 2 ]; do
  sleep 1
  now=$(prop WatchdogTimestampMonotonic)
  if [ "$now" != "$last" ]; then
    pings=$((pings + 1))
    last=$now
  fi
  [ $((SECONDS - READY_AT)) -lt 120 ] || fail "watchdog: only $pings pings in 120 s"
done
if [ "$(prop NRestarts)" != 0 ] || [ "$(prop MainPID)" != "$MAIN_PID" ]; then fail "restarted (watchdog?)"; fi
[ "$(prop ActiveState)" = active ] || fail "not active after $((wd_sec + 5)) s"
log "5. watchdog: $pings fresh WATCHDOG=1 pings seen, still pid $MAIN_PID past WatchdogSec=${wd_sec}s"

# ---- 6. stop: clean exit ----------------------------------------------------------------
IN systemctl stop tokend || fail "systemctl stop failed"
res="$(prop Result) $(prop ExecMainCode) $(prop ExecMainStatus)"
# ExecMainCode 1 = CLD_EXITED (a signal death would be 2 or 3).
[ "$res" = "success 1 0" ] || fail "stop: Result/ExecMainCode/ExecMainStatus = $res"
if journal_has 'SIGKILL|[Tt]imed out|Killing process'; then fail "stop needed a kill: $(journal | tail -n 5)"; fi
journal_has 'tokend stopped' || fail "no 'tokend stopped' in the journal"
log "6. systemctl stop: exited 0 (Result=success), no SIGKILL"

# ---- 7. broken config: 78, no restart loop ---------------------------------------------
echo 'not_a_key = 1' >>"$ROOT/etc/tokend/tokend.toml"
if IN systemctl start tokend 2>/dev/null; then fail "started with a broken config"; fi
restart_sec=$(span_sec "$(prop RestartUSec)")
sleep $((restart_sec + 3))
res="$(prop ActiveState) $(prop Result) $(prop ExecMainStatus) $(prop NRestarts)"
[ "$res" = "failed exit-code 78 0" ] || fail "broken config: ActiveState/Result/status/NRestarts = $res"
# shellcheck disable=SC2016 # the backquotes are literal, part of the message
journal_has 'unknown field `not_a_key`' || fail "the config error is not in the journal"
log "7. broken config: failed with status 78/CONFIG, no restart after RestartSec=${restart_sec}s + 3 s"

log "PASS (tests took $((SECONDS - TEST_START))s)"
