#!/usr/bin/env bash
# Static checks of deploy/tokend.service, offline (systemd need not be PID 1):
#   1. `systemd-analyze verify`: any output on stderr fails (it exits 0 on unknown keys);
#   2. `systemd-analyze security --offline=true`: fails when the exposure is over 1.2.
# Usage: bash deploy/ci/systemd-lint.sh        (root only to apt-get install systemd)
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/ci/lib.sh
ci_init systemd-lint
UNIT=${UNIT:-deploy/tokend.service}
MAX_EXPOSURE=${MAX_EXPOSURE:-1.2}

command -v systemd-analyze >/dev/null || apt_install systemd
log "$(systemd-analyze --version | head -1)"

WORK=$(mktemp -d)
trap 'rc=$?; rm -rf "$WORK"; log "took $((SECONDS - START))s; exit $rc"' EXIT

# `verify` insists that every Exec*= binary exists, and /usr/bin/tokend is not installed
# on a build machine. Instead of touching the host, verify inside a throwaway root
# (--root): the unit in its etc/systemd/system, the host's own unit files (for the
# targets it orders itself against) and stand-ins for the binaries it runs.
ROOT=$WORK/root
mkdir -p "$ROOT/usr/bin" "$ROOT/usr/lib/systemd" "$ROOT/etc/systemd/system"
ln -s usr/bin "$ROOT/bin"
for bin in tokend kill; do
  printf '#!/bin/sh\nexit 0\n' >"$ROOT/usr/bin/$bin"
  chmod 0755 "$ROOT/usr/bin/$bin"
done
for dir in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$dir" ]; then
    cp -a "$dir" "$ROOT/usr/lib/systemd/"
    break
  fi
done
cp "$UNIT" "$ROOT/etc/systemd/system/tokend.service"

log "systemd-analyze verify $UNIT"
set +e
timeout 60 systemd-analyze verify --root="$ROOT" tokend.service >"$WORK/verify.out" 2>"$WORK/verify.err"
rc=$?
set -e
cat "$WORK/verify.out" "$WORK/verify.err"
if [ "$rc" -ne 0 ] || [ -s "$WORK/verify.err" ]; then
  log "FAIL: systemd-analyze verify exited $rc and/or wrote to stderr (above)"
  exit 1
fi
log "verify: clean (exit 0, nothing on stderr)"

log "systemd-analyze security --offline=true $UNIT"
set +e
timeout 60 systemd-analyze security --offline=true --no-pager "$UNIT" >"$WORK/security.out" 2>"$WORK/security.err"
rc=$?
set -e
if [ -s "$WORK/security.err" ] || [ "$rc" -ne 0 ]; then
  cat "$WORK/security.out" "$WORK/security.err"
  log "FAIL: systemd-analyze security exited $rc and/or wrote to stderr"
  exit 1
fi
# Only the settings that still cost something, then the total.
grep -E '^✗' "$WORK/security.out" || true
score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$WORK/security.out")
if [ -z "$score" ]; then
  cat "$WORK/security.out"
  log "FAIL: no exposure level in the output"
  exit 1
fi
echo "exposure: $score (limit $MAX_EXPOSURE)"
if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
  log "FAIL: exposure $score is over $MAX_EXPOSURE"
  exit 1
fi
log "PASS"
