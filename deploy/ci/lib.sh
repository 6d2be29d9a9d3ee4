# shellcheck shell=bash
# Shared by the deployment checks in deploy/ci/ (sourced, not run): logging, package
# installation, waiting, a free loopback port and the `tokend demo` provider they all
# talk to. Each script keeps its own clean-up, since what it must tear down differs.

# ci_init NAME: prefixes log lines with NAME and the seconds since start; the EXIT trap
# set here only reports the total until the script installs its own clean-up.
ci_init() {
  CI_NAME=$1
  START=$SECONDS
  # shellcheck disable=SC2154 # rc is assigned inside the trap, which shellcheck does not follow
  trap 'rc=$?; log "total $((SECONDS - START))s; exit $rc"' EXIT
}
log() { echo "[$CI_NAME +$((SECONDS - START))s] $*"; }
fail() {
  log "FAIL: $*"
  exit 1
}

# apt_install PACKAGE...: installs the packages (none: does nothing), quietly and bounded
# in time. Callers pass only what they found missing.
apt_install() {
  [ $# -gt 0 ] || return 0
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# wait_for SECONDS COMMAND...: retries the command every half second until it succeeds.
wait_for() {
  local limit=$1 t0=$SECONDS
  shift
  until "$@"; do
    [ $((SECONDS - t0)) -lt "$limit" ] || return 1
    sleep 0.5
  done
}

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  return 1
}

# start_demo BIN DIR: `tokend demo` on the host as the OAuth provider; sets DEMO_PID and
# TOKEN_URL. Its output goes to DIR/demo.out and DIR/demo.err.
start_demo() {
  "$1" demo >"$2/demo.out" 2>"$2/demo.err" </dev/null &
  DEMO_PID=$!
  wait_for 20 grep -qs 'provider is running at' "$2/demo.out" || fail "tokend demo did not start"
  TOKEN_URL=$(sed -n 's/.*provider is running at \(http:[^ ]*\).*/\1/p' "$2/demo.out")
  log "provider: $TOKEN_URL (tokend demo, pid $DEMO_PID)"
}

# demo_config PORT ACCOUNT...: a tokend config, on stdout, that listens on 127.0.0.1:PORT
# with one client_credentials account per name against the demo provider at $TOKEN_URL
# (start_demo sets it); the client secret is read from the credential demo-service-secret.
demo_config() {
  local port=$1 name
  shift
  echo '[server]'
  echo "listen = [\"127.0.0.1:$port\"]"
  for name in "$@"; do
    cat <<EOF

[accounts.$name]
grant = "client_credentials"
token_url = "$TOKEN_URL"
client_id = "demo-service"
client_secret = { file = "demo-service-secret" }
scope = "demo.example.com"
EOF
  done
}

# stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS; only a process this script
# started and that still runs.
stop_pid() {
  local pid=$1 grace=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq "$grace"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  wait "$pid" 2>/dev/null
}
