# Shared by bench/run.sh and bench/ha.sh (sourced, not run): the processes a run starts
# and stops, the result rows and the table, other processes' CPU load, the fake provider
# and tokend launchers, the read-throughput measurement, the tools, the build.
#
# The caller sets OUT (absolute), QUICK (0/1), MODE, BUILD, INSTALL, STRICT, and calls
# bench_init before anything else here.

CONNS=64 # load-generator connections in the read tests

bench_init() {
  mkdir -p "$OUT"
  RESULTS=$OUT/results.tsv
  : > "$RESULTS"
  CLK_TCK=$(getconf CLK_TCK)
  NCPU=$(nproc)
  T_BEGIN=$SECONDS
  OUR_PGID=$(ps -o pgid= $$ | tr -d ' ')
  if [ "$NCPU" -ge 2 ]; then ON_CPU0=(taskset -c 0) ON_CPU1=(taskset -c 1); else ON_CPU0=() ON_CPU1=(); fi
  PIDS=()
  trap cleanup EXIT
}

# Every process the run started is stopped by its pid: SIGTERM, then SIGKILL after 5 s.
# A caller may define cleanup_first (run before) and cleanup_last (run after) for what
# is not in PIDS.
cleanup() {
  local pid
  if declare -F cleanup_first > /dev/null; then cleanup_first || true; fi
  for pid in "${PIDS[@]}"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if declare -F cleanup_last > /dev/null; then cleanup_last || true; fi
}
# forget PID: a process that has ended leaves PIDS, so that its number, once reused by
# someone else's process, is never signalled.
forget() {
  local keep=() pid
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}
stop() { # stop PID: SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  { wait "$pid"; } 2>/dev/null || true
  forget "$pid"
}

log() { printf '[%4ds] %s\n' $((SECONDS - T_BEGIN)) "$*" | tee -a "$OUT/run.log" >&2; }
# get KEY FILE: the value of a key=value line
get() { sed -n "s/^$1=//p" "$2" | tail -1; }
# pin CPU CMD...: run on one CPU when there are at least two (foreground use only; for a
# background process use "${ON_CPU0[@]}" so that $! is the process itself)
pin() { local cpu=$1; shift; if [ "$NCPU" -ge 2 ]; then taskset -c "$cpu" "$@"; else "$@"; fi; }
calc() { awk "BEGIN { printf \"%s\", ($*) }"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# row TARGET MEASURED BASELINE LIMIT_OP LIMIT UNIT [NOTE]: one line of the table.
# ratio = measured / baseline when a baseline is given; verdict = measured OP limit.
row() {
  local target=$1 measured=$2 baseline=$3 op=$4 limit=$5 unit=$6 note=${7:-}
  local ratio="-" verdict="-"
  if [[ "$baseline" =~ ^[0-9.]+$ && "$measured" =~ ^-?[0-9.]+$ ]] && [ "$(calc "$baseline > 0")" = 1 ]; then
    ratio=$(calc "sprintf(\"%.2f\", $measured / $baseline)")
  fi
  if [ "$op" != "-" ]; then
    local lhs=$measured
    case "$op" in *ratio) lhs=$ratio; op=${op%ratio} ;; esac
    if [[ "$lhs" =~ ^-?[0-9.]+$ ]]; then
      if [ "$(calc "$lhs $op $limit")" = 1 ]; then verdict=PASS; else verdict=FAIL; fi
    else
      verdict=FAIL
    fi
  fi
  local shown_limit="-"
  [ "$op" != "-" ] && shown_limit="$op $limit"
  case "$4" in *ratio) shown_limit="ratio $op $limit" ;; esac
  printf '%s\t%s %s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$measured" "$unit" "$baseline" "$ratio" \
    "$shown_limit" "$verdict" "${OTHER:--}" "$note" >> "$RESULTS"
  log "result: $target = $measured $unit (baseline $baseline, ratio $ratio, limit $shown_limit): $verdict"
}

# sample PID FILE: every second, "unix_ms cpu_ticks rss_kb" until the process ends
sample() {
  local pid=$1 file=$2
  while [ -r "/proc/$pid/stat" ]; do
    local stat rss
    stat=$(cut -d' ' -f14,15 "/proc/$pid/stat" 2>/dev/null) || break
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || break
    echo "$(date +%s%3N) $(( ${stat% *} + ${stat#* } )) $rss" >> "$file"
    sleep 1
  done
}
cpu_ticks() { local s; s=$(cut -d' ' -f14,15 "/proc/$1/stat"); echo $(( ${s% *} + ${s#* } )); }
rss_kb() { awk "/^$2:/ { print \$2 }" "/proc/$1/status"; }

# provider KEY ARGS...: start examples/fake_provider; sets ${KEY}_PID and sources its addresses
provider() {
  local key=$1; shift
  local dir=$OUT/$key
  mkdir -p "$dir"
  rm -rf "$dir/state" "$dir/addrs"
  mkdir -m 700 "$dir/state"
  "$EX/fake_provider" --config-out "$dir/tokend.toml" --state-dir "$dir/state" \
    --addr-file "$dir/addrs" "$@" > "$dir/provider.out" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  eval "${key}_PID=$pid"
  for _ in $(seq 1200); do [ -f "$dir/addrs" ] && break; sleep 0.1; done
  [ -f "$dir/addrs" ] || { log "fake provider $key did not start"; cat "$dir/provider.out" >&2; exit 1; }
  eval "$(sed "s/^/${key}_/" "$dir/addrs")"
}
hostport() { echo "${1#http://}"; }

# await_ready URL PID LABEL LOG [PATH]: wait (up to 120 s) until URL/PATH (/readyz)
# answers 200; exit if the process ends first.
await_ready() {
  local url=$1 pid=$2 label=$3 logfile=$4 path=${5:-/readyz}
  for _ in $(seq 1200); do
    curl -sf -o /dev/null "$url$path" && return 0
    kill -0 "$pid" 2>/dev/null || { log "tokend ($label) exited"; tail -20 "$logfile" >&2; exit 1; }
    sleep 0.1
  done
  log "tokend ($label) not ready after 120 s"; exit 1
}

# daemon KEY [pinned]: start tokend (on CPU 0 when a second argument is given) on $OUT/KEY/tokend.toml; sets ${KEY}_DPID; waits for /readyz
daemon() {
  local key=$1 cpu=${2:-} dir=$OUT/$1
  if [ -n "$cpu" ]; then
    RUST_LOG=info "${ON_CPU0[@]}" "$TOKEND" run --config "$dir/tokend.toml" 2> "$dir/tokend.log" &
  else
    RUST_LOG=info "$TOKEND" run --config "$dir/tokend.toml" 2> "$dir/tokend.log" &
  fi
  local pid=$!
  PIDS+=("$pid")
  eval "${key}_DPID=$pid"
  await_ready "$(get daemon "$dir/addrs")" "$pid" "$key" "$dir/tokend.log"
}

# Other people's CPU use (this machine is shared: builds, tests): the sum of
# utime+stime+cutime+cstime over every process outside this run's process group. A
# process that exits hands its time to its parent's cutime, so deltas stay meaningful.
foreign_ticks() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v pg="$OUR_PGID" '{
    # the command name may hold spaces: count fields from the closing parenthesis
    i = index($0, ") "); n = split(substr($0, i + 2), f, " ")
    if (f[3] != pg) t += f[12] + f[13] + f[14] + f[15] } END { printf "%d", t }'
}
FOREIGN_T=0 FOREIGN_C=0
foreign_mark() { FOREIGN_T=$(date +%s%N); FOREIGN_C=$(foreign_ticks); }
# foreign_since: other processes' CPU since foreign_mark, in % of one core
foreign_since() {
  local c t; c=$(foreign_ticks); t=$(date +%s%N)
  calc "sprintf(\"%.0f\", ($c - $FOREIGN_C) * 100 / $CLK_TCK / (($t - $FOREIGN_T) / 1e9))"
}
# quiet: wait (full mode: up to ~40 s) until the machine is mostly idle before a
# timing-sensitive test
quiet() {
  local b tries=20
  [ "$QUICK" = 1 ] && tries=1
  for _ in $(seq "$tries"); do
    b=$(busy_percent)
    [ "$b" -le 10 ] && return 0
    log "  waiting for a quieter machine (${b}% busy)"
  done
  log "  WARNING: the machine stayed busy; measuring anyway"
}

busy_percent() { # CPU busy share of the whole machine over 2 s
  local a b
  a=$(awk '/^cpu / { print $2+$3+$4+$6+$7+$8, $5 }' /proc/stat); sleep 2
  b=$(awk '/^cpu / { print $2+$3+$4+$6+$7+$8, $5 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.0f", 100 * busy / (busy + idle + 1e-9) }'
}

# The load generator and the CLI timer are well-known tools from the OS packages.
install_tools() {
  local missing=()
  command -v wrk > /dev/null || missing+=(wrk)
  command -v hyperfine > /dev/null || missing+=(hyperfine)
  command -v oidc-token > /dev/null || missing+=(oidc-agent-cli) # row 7b's comparison
  if [ "$INSTALL" = 1 ] && [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      log "installing ${missing[*]} (apt-get)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        > "$OUT/install.log" 2>&1 || log "could not install ${missing[*]} (see $OUT/install.log): using the fallbacks"
    else
      log "${missing[*]} missing and not root: using the fallbacks"
    fi
  fi
}

# machine_info [LINE...]: the machine, the tools and the commit, to $OUT/machine.txt; warns
# when the machine is busy before the run (BUSY is set).
machine_info() {
  {
    echo "mode=$MODE"
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo '+uncommitted src changes')"
    echo "nproc=$NCPU"
    echo "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "mem_total_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
    echo "kernel=$(uname -r)"
    echo "rustc=$(rustc --version 2>/dev/null || echo unknown)"
    echo "wrk=$(if command -v wrk > /dev/null; then (wrk -v 2>&1 || true) | head -1; else echo none; fi)"
    echo "hyperfine=$(command -v hyperfine > /dev/null && hyperfine --version || echo none)"
    echo "MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-unset}"
    local line
    for line in "$@"; do echo "$line"; done
  } > "$OUT/machine.txt"
  BUSY=$(busy_percent)
  echo "busy_before_percent=$BUSY" >> "$OUT/machine.txt"
  if [ "$BUSY" -gt 10 ]; then
    log "WARNING: the machine is ${BUSY}% busy before the run (other processes); numbers will be noisy"
  fi
}

# build_binaries: release binaries (when BUILD=1), then sets TOKEND and EX and checks them.
build_binaries() {
  if [ "$BUILD" = 1 ]; then
    # Two builds: together, the examples' dev-dependency features (tokio test-util, ...)
    # would be unified into the measured tokend, a bigger binary than users get (~45 more
    # page faults per start of `tokend token`).
    log "building release binaries (cargo build --release --examples; then --bins, as users build it)"
    local t=$SECONDS
    cargo build --release --locked --examples 2>&1 | tail -3 >&2
    cargo build --release --locked --bins 2>&1 | tail -3 >&2
    log "build took $((SECONDS - t)) s"
  fi
  local target_dir=${CARGO_TARGET_DIR:-target}
  TOKEND=$target_dir/release/tokend
  EX=$target_dir/release/examples
  local b
  for b in "$TOKEND" "$EX/fake_provider" "$EX/bench_client" "$EX/hello" "$EX/true_bin"; do
    [ -x "$b" ] || { echo "missing $b: run without --no-build" >&2; exit 1; }
  done
}

# throughput ADDR LABEL PID DIR [ACCOUNTS [LIST]]: prints "requests/s cpu_us_per_request"
# (the server's own utime+stime per request: unlike req/s, it barely moves when other
# processes compete). Reads random accounts among ACCOUNTS (default READ_ACCOUNTS), or
# among LIST (comma-separated indices) with wrk. Sets LOADGEN.
if command -v wrk > /dev/null; then
  LOADGEN="wrk -t1 -c$CONNS (Lua: random account)"
  throughput() {
    local c0 c1 accounts=${5:-$READ_ACCOUNTS}
    c0=$(cpu_ticks "$3")
    pin 1 timeout 60 wrk -t1 -c"$CONNS" -d"${WRK_SECONDS}s" --latency -s bench/token.lua "http://$1" -- "$accounts" ${6:+"$6"} \
      > "$4/wrk-$2.txt" 2>&1
    c1=$(cpu_ticks "$3")
    awk -v c=$((c1 - c0)) -v tck="$CLK_TCK" '/ requests in / { n = $1 } /^Requests\/sec:/ { r = $2 }
      END { printf "%.0f %.2f\n", r, c * 1e6 / tck / n }' "$4/wrk-$2.txt"
  }
else
  LOADGEN="bench_client closed loop, $CONNS connections (wrk not installed)"
  throughput() {
    local c0 c1 accounts=${5:-$READ_ACCOUNTS}
    c0=$(cpu_ticks "$3")
    pin 1 timeout 60 "$EX/bench_client" rate --addr "$1" --accounts "$accounts" --rate 1000000 \
      --duration "$WRK_SECONDS" --warmup 0.5 --connections "$CONNS" > "$4/closed-$2.txt"
    c1=$(cpu_ticks "$3")
    awk -v c=$((c1 - c0)) -v tck="$CLK_TCK" -v s="$WRK_SECONDS" '/^achieved_rps=/ { split($0, a, "="); r = a[2] }
      END { printf "%.0f %.2f\n", r, c * 1e6 / tck / (r * (s + 0.5)) }' "$4/closed-$2.txt"
  }
fi

# finish: the table (table.tsv, table.md, printed), and the exit status: 3 when a row has
# no number (the harness broke), 1 with STRICT when a target failed, else 0.
finish() {
  {
    printf 'target\tmeasured\tbaseline\tratio\tlimit\tresult\tother load\tnotes\n'
    cat "$RESULTS"
  } > "$OUT/table.tsv"
  {
    echo "| target | measured | baseline | ratio | limit | result | other load | how / notes |"
    echo "|---|---|---|---|---|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }' "$RESULTS"
  } > "$OUT/table.md"
  echo
  cut -f1-7 "$OUT/table.tsv" | column -t -s $'\t'
  echo
  echo "other load: CPU used by processes outside this run during the test, in % of one core"
  echo "(this machine may be shared; above ~10% the timing rows are unreliable)"
  echo "machine: $(get cpu "$OUT/machine.txt"), $NCPU CPUs, $(( $(get mem_total_kb "$OUT/machine.txt") / 1024 )) MB; busy before run: ${BUSY}%"
  echo "notes per row: $OUT/table.md; logs: $OUT"
  log "done in $((SECONDS - T_BEGIN)) s"
  local fails unmeasured
  fails=$(awk -F'\t' '$6 == "FAIL"' "$RESULTS" | wc -l)
  echo "$(awk -F'\t' '$6 == "PASS"' "$RESULTS" | wc -l) passed, $fails failed"
  # A row without a number means the harness itself broke (a server did not start, a tool
  # failed): that fails the run whatever --strict says, so CI's smoke run catches it.
  unmeasured=$(awk -F'\t' '{ split($2, m, " ") } m[1] !~ /^-?[0-9.]+$/ { print $1 }' "$RESULTS")
  if [ -n "$unmeasured" ]; then
    echo "not measured (harness failure):" >&2
    echo "$unmeasured" | sed 's/^/  /' >&2
    exit 3
  fi
  if [ "$STRICT" = 1 ] && [ "$fails" -gt 0 ]; then exit 1; fi
  exit 0
}
