#!/usr/bin/env bash
# postfix-reference.sh — relaycar vs a stock Postfix relay, driven the way
# users send: Postfix's smtp-source, one connection per message.
#
#   sudo tools/postfix-reference.sh            # or: make bench-smtp
#
# In one run, on loopback only, it measures for each mix (payload size x
# parallel sessions: 2 KB x 1, 2 KB x 8, 2 KB x 32, 1 MB x 32):
#   direct    smtp-source -> smtp-sink             (the client/sink ceiling)
#   relaycar  smtp-source -> relaycar -> smtp-sink  (type: smtp, tls: none)
#   Postfix   smtp-source -> Postfix  -> smtp-sink  (relayhost = [127.0.0.1]:port)
# Each run's accept rate is messages / wall time of smtp-source (every
# message answered 250, which both relays send only after an fsync); its
# end-to-end rate is messages / time until the sink has counted them all.
# Rounds are interleaved (direct, relaycar, Postfix, ...) and every figure is
# the median of $ROUNDS rounds. relaycar is restarted for each mix, so its
# peak RSS (VmHWM) is per mix. At 2 KB x 1 it also runs tools/bench latency
# (sequential, one connection per message) against both relays for p50/p99
# of connect -> 250 after DATA. With FLOOR=1 the one-session mixes also
# measure tools/bench floor: the go-smtp that relaycar builds, answering 250
# after an in-place write and fdatasync of one file (the most a durable relay
# on that library can accept here), and discarding (the library alone).
#
# What runs, all bound to 127.0.0.1 and stopped by PID at the end (also on
# error / Ctrl-C, and by a watchdog after $MAX_SECONDS):
#   three smtp-sink processes (one per target, discarding; -c counters to a
#   file, which is how messages are counted), one relaycar per mix with its
#   spool in the temp dir, and a private Postfix instance whose
#   config_directory, queue_directory and data_directory are in the temp dir.
#
# Postfix is installed if missing (Debian package, debconf "No configuration";
# the system instance is never started). Needs root (Postfix does).
#
# Env knobs (defaults in brackets):
#   ROUNDS [3]          rounds per mix and target; the table shows medians
#   SMALL_COUNT [2000]  messages per 2 KB run      LARGE_COUNT [300] per 1 MB run
#   SMALL_SIZE [2048]   LARGE_SIZE [1048576]       (smtp-source -l, bytes)
#   MIXES               overrides the mixes: "SIZE:SESSIONS:COUNT ..."
#   LAT_COUNT [1000]    messages per latency round (0 skips it)
#   BASE_PORT [25350]   ports BASE..BASE+5 on 127.0.0.1 must be free (..+7 with FLOOR=1)
#   RELAYCAR            relaycar binary to use [built from this checkout]
#   RELAYCAR_LOG_LEVEL  relaycar's log level [its default, info]
#   RUN_TIMEOUT [120]   seconds for one run (smtp-source + sink wait)
#   MAX_SECONDS [900]   watchdog for the whole script
#   BENCH_TMP [/var/tmp] where the temp dir goes (keep it on the real disk)
#   FS=ext4-journal     put the temp dir on a fresh ext4 with a journal (mkfs.ext4's
#                       default, and most hosts'): a 2 GiB image in BENCH_TMP, loop-
#                       mounted under /var/tmp (Postfix logs only under /var), removed
#                       at the end. The report says whether the spool's file system
#                       has a journal; a VM's root disk often has none.
#   COUNT_TMP [/dev/shm] where the sinks' counter files go (off the disk under
#                       test; falls back to the temp dir when not writable)
#   NEIGHBOUR=1         while measuring, another process streams writes (dd,
#                       256 MiB files, no sync) into the temp dir's file
#                       system, as logs or other apps on a shared disk do
#   FLOOR=1             at one session, also measure the go-smtp floor (above)
#   KEEP=1              keep the temp dir (logs, raw results) at the end
#   GO [go]
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SMALL_SIZE=${SMALL_SIZE:-2048}
LARGE_SIZE=${LARGE_SIZE:-1048576}
SMALL_COUNT=${SMALL_COUNT:-2000}
LARGE_COUNT=${LARGE_COUNT:-300}
MIXES=${MIXES:-"$SMALL_SIZE:1:$SMALL_COUNT $SMALL_SIZE:8:$SMALL_COUNT $SMALL_SIZE:32:$SMALL_COUNT $LARGE_SIZE:32:$LARGE_COUNT"}
LAT_COUNT=${LAT_COUNT:-1000}
BASE_PORT=${BASE_PORT:-25350}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
MAX_SECONDS=${MAX_SECONDS:-900}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
COUNT_TMP=${COUNT_TMP:-/dev/shm}
GO=${GO:-go}
FROM=load@example.com
TO=sink@example.net

REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "[$(date +%T)] $*" >&2; }
die() { echo "postfix-reference: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || { echo "must run as root (postfix needs it)" >&2; exit 2; }

# ---- install -----------------------------------------------------------------
# Idempotent. "No configuration" leaves /etc/postfix without main.cf, and the
# system instance is never started: policy-rc.d denies it during the install
# (a temporary one is put in place if the machine has none), and nothing here
# ever runs plain `postfix start`.
if [ ! -x /usr/sbin/smtp-source ] || [ ! -x /usr/sbin/smtp-sink ] || [ ! -x /usr/sbin/postfix ]; then
  log "installing postfix (No configuration) ..."
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    tmp_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q postfix >/dev/null
  if [ "$tmp_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
ls /usr/sbin/smtp-source /usr/sbin/smtp-sink >/dev/null
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink

# ---- ports, temp dir, cleanup ----------------------------------------------------
SINK_DIRECT=$BASE_PORT; SINK_RELAY=$((BASE_PORT + 1)); SINK_PF=$((BASE_PORT + 2))
RELAY_PORT=$((BASE_PORT + 3)); RELAY_ADMIN=$((BASE_PORT + 4)); PF_PORT=$((BASE_PORT + 5))
FLOOR_PORT=$((BASE_PORT + 6)); FLOOR_SYNC_PORT=$((BASE_PORT + 7))
FLOOR=${FLOOR:-0}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports="$SINK_DIRECT $SINK_RELAY $SINK_PF $RELAY_PORT $RELAY_ADMIN $PF_PORT"
if [ "$FLOOR" = 1 ]; then ports="$ports $FLOOR_PORT $FLOOR_SYNC_PORT"; fi
for p in $ports; do
  if port_busy "$p"; then die "127.0.0.1:$p is in use; set BASE_PORT"; fi
done

LOOP_IMG="" LOOP_MNT=""
unmount_fs() {
  if [ -n "$LOOP_MNT" ]; then umount "$LOOP_MNT" && rmdir "$LOOP_MNT"; fi
  if [ -n "$LOOP_IMG" ]; then rm -f "$LOOP_IMG"; fi
  LOOP_MNT="" LOOP_IMG=""
}
case ${FS:-} in
  "") ;;
  ext4-journal)
    trap unmount_fs EXIT # until cleanup's trap below takes over
    LOOP_IMG=$(mktemp "$BENCH_TMP/relaycar-bench-fs.XXXXXX")
    truncate -s 2G "$LOOP_IMG"
    mkfs.ext4 -q -F "$LOOP_IMG"
    LOOP_MNT=$(mktemp -d /var/tmp/relaycar-bench-mnt.XXXXXX)
    mount -o loop "$LOOP_IMG" "$LOOP_MNT"
    BENCH_TMP=$LOOP_MNT
    ;;
  *) die "FS=$FS: only ext4-journal is known" ;;
esac
WORK=$(mktemp -d "$BENCH_TMP/relaycar-bench.XXXXXX")
chmod 755 "$WORK"   # Postfix daemons (user postfix) must traverse it
PF_CONF=$WORK/postfix/conf PF_QUEUE=$WORK/postfix/queue PF_DATA=$WORK/postfix/data
PF_LOG=$WORK/postfix/maillog
RESULTS=$WORK/results.tsv
# The sinks' counters are the apparatus, not the system under test: on the
# disk they would be dirty pages that relaycar's syncfs flushes with every
# commit while Postfix's per-file fsync never sees them.
COUNTS=$(mktemp -d "$COUNT_TMP/relaycar-bench-counts.XXXXXX" 2>/dev/null) || COUNTS=$WORK
: > "$RESULTS"

SINK_PIDS=() RELAY_PID="" RELAY_TPID="" WATCHDOG_PID="" NEIGHBOUR_PID=""
stop_pid() { # PID [seconds]: TERM, wait, then KILL
  local pid=$1 t=${2:-15}
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((t * 10))); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
pf_master_pid() { head -1 "$PF_QUEUE/pid/master.pid" 2>/dev/null | tr -d ' ' || true; }
stop_pf() {
  [ -f "$PF_CONF/main.cf" ] || return 0
  local mp; mp=$(pf_master_pid)
  postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
  if [ -n "$mp" ]; then
    for _ in $(seq 1 100); do kill -0 "$mp" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$mp" 2
  fi
}
stop_relay() {
  if [ -n "$RELAY_TPID" ]; then stop_pid "$RELAY_TPID" 20; wait "$RELAY_TPID" 2>/dev/null || true; fi
  RELAY_PID="" RELAY_TPID=""
}
cleanup() {
  set +e
  stop_relay
  stop_pf
  stop_pid "$NEIGHBOUR_PID" 5
  for p in "${SINK_PIDS[@]}"; do stop_pid "$p" 2; done
  [ -n "$WATCHDOG_PID" ] && stop_pid "$WATCHDOG_PID" 1
  if [ "${KEEP:-0}" = 1 ] && [ -z "$LOOP_MNT" ]; then log "kept $WORK $COUNTS"; else rm -rf "$WORK" "$COUNTS"; fi
  unmount_fs
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Watchdog: if the script is still running after MAX_SECONDS, stop Postfix
# (which outlives a killed script) and then the script, whose trap stops the rest.
( trap 'kill "$sp" 2>/dev/null; exit 0' TERM
  sleep "$MAX_SECONDS" & sp=$!; wait "$sp"
  echo "postfix-reference: watchdog: over ${MAX_SECONDS}s, stopping" >&2
  postfix -c "$PF_CONF" stop >/dev/null 2>&1; kill -TERM $$ ) 2>/dev/null &
WATCHDOG_PID=$!

# ---- build -------------------------------------------------------------------------
log "building tools/bench$([ -n "${RELAYCAR:-}" ] || echo " and relaycar") ..."
(cd "$REPO" && "$GO" build -o "$WORK/bench" ./tools/bench)
if [ -z "${RELAYCAR:-}" ]; then
  (cd "$REPO" && CGO_ENABLED=0 "$GO" build -trimpath -o "$WORK/relaycar" ./cmd/relaycar)
  RELAYCAR=$WORK/relaycar
fi
[ -x "$RELAYCAR" ] || die "no relaycar binary at $RELAYCAR"
BENCH=$WORK/bench

# ---- sinks ---------------------------------------------------------------------------
# smtp-sink discards everything; -c writes "sess=N quit=N mesg=N\r" records to
# a file (not a tty) as counts change, which tools/bench reads to count
# deliveries. Nothing that costs time is on: no -d/-D dump (a disk write per
# message), no -v, no -s syslog, no -w/-W delays; the listen backlog is 256
# and -m (concurrent sessions) stays at its default 256, above every client's
# concurrency here (32 sessions, relaycar's 16 workers, Postfix's 20). Each
# sink is wrapped in `timeout` so it ends by itself.
start_sink() { # NAME PORT
  timeout "$MAX_SECONDS" "$SMTP_SINK" -u postfix -c "127.0.0.1:$2" 256 \
    > "$COUNTS/sink-$1.count" 2> "$WORK/sink-$1.err" &
  SINK_PIDS+=("$!")
}
start_sink direct "$SINK_DIRECT"
start_sink relay "$SINK_RELAY"
start_sink postfix "$SINK_PF"
for p in $SINK_DIRECT $SINK_RELAY $SINK_PF; do
  for _ in $(seq 1 50); do port_busy "$p" && break; sleep 0.1; done
  port_busy "$p" || die "smtp-sink did not listen on 127.0.0.1:$p: $(cat "$WORK"/sink-*.err)"
done
if [ "$FLOOR" = 1 ]; then
  # Stopped by PID with the sinks; -max-time and `timeout` end them anyway.
  mkdir -p "$WORK/floor"
  timeout "$MAX_SECONDS" "$BENCH" floor -addr "127.0.0.1:$FLOOR_PORT" -max-time "${MAX_SECONDS}s" \
    2> "$WORK/floor.err" &
  SINK_PIDS+=("$!")
  timeout "$MAX_SECONDS" "$BENCH" floor -addr "127.0.0.1:$FLOOR_SYNC_PORT" -dir "$WORK/floor" \
    -max-time "${MAX_SECONDS}s" 2> "$WORK/floor-sync.err" &
  SINK_PIDS+=("$!")
  for p in $FLOOR_PORT $FLOOR_SYNC_PORT; do
    for _ in $(seq 1 50); do port_busy "$p" && break; sleep 0.1; done
    port_busy "$p" || die "bench floor did not listen on 127.0.0.1:$p: $(cat "$WORK"/floor*.err)"
  done
fi

# ---- Postfix ---------------------------------------------------------------------------
# A private instance with stock settings except what a private loopback relay
# needs: where its files are, which port it listens on, whom it relays for,
# and where it relays to. Queue files are fsynced before 250 (the default).
mkdir -p "$PF_CONF" "$PF_QUEUE" "$PF_DATA"
chown postfix:postfix "$PF_DATA"
cat > "$PF_CONF/main.cf" <<EOF
# private relaycar benchmark instance — written by tools/postfix-reference.sh
compatibility_level = 3.6
config_directory = $PF_CONF
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
myhostname = postfix-ref.localdomain
mydomain = localdomain
myorigin = \$myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# nothing is delivered locally; every recipient goes to the sink
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:$SINK_PF
# no syslog daemon here: log to a file through postlogd
maillog_file = $PF_LOG
EOF
# master.cf: Debian's default with the port-25 listener moved to our loopback
# port and chroot off (upstream's default; Debian's chroot would need /etc
# files copied into the temp queue dir).
awk -v port="$PF_PORT" '
  /^smtp[ \t]+inet/ { print "127.0.0.1:" port " inet n - n - - smtpd"; next }
  /^#/ || /^[ \t]*$/ { print; next }
  { if ($5 == "y") $5 = "n"; print }
' /usr/share/postfix/master.cf.dist > "$PF_CONF/master.cf"
postfix -c "$PF_CONF" check >/dev/null 2>&1 || postfix -c "$PF_CONF" check
if ! postfix -c "$PF_CONF" start >/dev/null 2>&1; then
  tail -5 "$PF_LOG" >&2 2>/dev/null || true
  die "postfix start failed"
fi
for _ in $(seq 1 50); do port_busy "$PF_PORT" && break; sleep 0.2; done
port_busy "$PF_PORT" || die "postfix did not listen on 127.0.0.1:$PF_PORT; see $PF_LOG"
PF_VERSION=$(postconf -c "$PF_CONF" -h mail_version)

pf_queue_len() {
  find "$PF_QUEUE"/maildrop "$PF_QUEUE"/incoming "$PF_QUEUE"/active "$PF_QUEUE"/deferred \
    "$PF_QUEUE"/hold -type f 2>/dev/null | wc -l
}

# ---- relaycar --------------------------------------------------------------------------
# relay.yaml's settings, except addresses, the temp spool and the upstream.
start_relay() { # TAG
  local dir=$WORK/relay-$1
  mkdir -p "$dir"
  cat > "$dir/relay.yaml" <<EOF
listen:
  address: 127.0.0.1:$RELAY_PORT
  hostname: relaycar.local
  allowed_networks: [127.0.0.0/8]
admin:
  address: 127.0.0.1:$RELAY_ADMIN
spool:
  dir: $dir/spool
  workers: 16
upstreams:
  - {name: sink, type: smtp, address: "127.0.0.1:$SINK_RELAY", tls: none}
routes:
  - {name: default, upstreams: [sink], strategy: failover}
EOF
  local lvl=()
  if [ -n "${RELAYCAR_LOG_LEVEL:-}" ]; then lvl=(--log-level "$RELAYCAR_LOG_LEVEL"); fi
  timeout "$MAX_SECONDS" "$RELAYCAR" serve --config "$dir/relay.yaml" "${lvl[@]}" \
    > "$dir/relaycar.log" 2>&1 &
  RELAY_TPID=$!
  for _ in $(seq 1 100); do
    if curl -fs -o /dev/null "http://127.0.0.1:$RELAY_ADMIN/readyz"; then break; fi
    kill -0 "$RELAY_TPID" 2>/dev/null || { cat "$dir/relaycar.log" >&2; die "relaycar exited"; }
    sleep 0.1
  done
  curl -fs -o /dev/null "http://127.0.0.1:$RELAY_ADMIN/readyz" || die "relaycar not ready; see $dir/relaycar.log"
  RELAY_PID=$(pgrep -P "$RELAY_TPID" | head -1)
  [ -n "$RELAY_PID" ] || die "cannot find relaycar's PID"
}
relay_spool_len() {
  curl -fs "http://127.0.0.1:$RELAY_ADMIN/metrics" | awk '$1 == "relaycar_spool_messages" { print int($2) }'
}
vmhwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---- one run ---------------------------------------------------------------------------
# run TARGET SIZE SESSIONS COUNT [ROUND]: times smtp-source and waits for the
# target's sink to count COUNT messages; appends to $RESULTS unless ROUND=warm.
run() {
  local target=$1 size=$2 sess=$3 count=$4 round=${5:-warm} port counted out
  case $target in
    direct) port=$SINK_DIRECT counted=(-counter "$COUNTS/sink-direct.count" -want "$count") ;;
    relaycar) port=$RELAY_PORT counted=(-counter "$COUNTS/sink-relay.count" -want "$count") ;;
    postfix) port=$PF_PORT counted=(-counter "$COUNTS/sink-postfix.count" -want "$count") ;;
    floor) port=$FLOOR_PORT counted=() ;;           # nothing to deliver: accept only
    floor-sync) port=$FLOOR_SYNC_PORT counted=() ;;
  esac
  if ! out=$("$BENCH" time "${counted[@]}" -timeout "${RUN_TIMEOUT}s" -- \
      "$SMTP_SOURCE" -s "$sess" -m "$count" -l "$size" -f "$FROM" -t "$TO" \
      -M client.localdomain "127.0.0.1:$port"); then
    [ "$target" = postfix ] && tail -5 "$PF_LOG" >&2
    [ "$target" = relaycar ] && tail -5 "$WORK"/relay-*/relaycar.log >&2
    die "$target run failed (size=$size sessions=$sess count=$count)"
  fi
  # Let the relay finish its bookkeeping so runs do not overlap.
  local n
  for _ in $(seq 1 100); do
    case $target in
      relaycar) n=$(relay_spool_len) ;;
      postfix) n=$(pf_queue_len) ;;
      *) n=0 ;;
    esac
    [ "$n" = 0 ] && break
    sleep 0.1
  done
  if [ "$round" != warm ]; then
    # mix target round count accept_s e2e_s
    echo "$size:$sess $target $round $count $(echo "$out" | sed 's/accept=//; s/e2e=//')" >> "$RESULTS"
    log "  $target round $round: $(echo "$out" | awk -v c="$count" '{ split($1,a,"="); split($2,b,"="); printf "accept %.0f msgs/s", c/a[2]; if (b[2] != "-") printf ", end-to-end %.0f msgs/s", c/b[2] }')"
  fi
  sleep 0.5
}

lat_run() { # TARGET ROUND
  local port
  case $1 in relaycar) port=$RELAY_PORT ;; postfix) port=$PF_PORT ;; esac
  local out
  out=$("$BENCH" latency -addr "127.0.0.1:$port" -n "$LAT_COUNT" -size "$SMALL_SIZE" \
    -from "$FROM" -to "$TO" -max-time "${RUN_TIMEOUT}s") || die "latency run against $1 failed"
  echo "lat $1 $2 $out" >> "$RESULTS"
  log "  latency $1 round $2: $out"
  sleep 0.5
}

# ---- measure ---------------------------------------------------------------------------
if [ "${NEIGHBOUR:-0}" = 1 ]; then
  # Stopped by PID at the end (its dd with it), and by `timeout` at the latest.
  timeout "$MAX_SECONDS" bash -c 'trap "kill \$dd 2>/dev/null; exit 0" TERM
    while :; do dd if=/dev/zero of="$1" bs=1M count=256 status=none & dd=$!; wait $dd; done' \
    _ "$WORK/neighbour.bin" &
  NEIGHBOUR_PID=$!
  log "neighbour: dd streaming into $WORK/neighbour.bin (pid $NEIGHBOUR_PID)"
fi
log "work dir $WORK; postfix $PF_VERSION; rounds=$ROUNDS mixes=\"$MIXES\" latency=$LAT_COUNT"
START=$SECONDS
lat_done=0
for mix in $MIXES; do
  IFS=: read -r size sess count <<< "$mix"
  log "mix ${size}B x $sess sessions, $count messages"
  start_relay "${size}x$sess"
  # warm-up (process pools, caches, slow start), not reported
  warm=$((sess * 4 > 100 ? sess * 4 : 100))
  if [ "$size" -gt 65536 ]; then warm=$((sess * 2)); fi
  floors=()
  if [ "$FLOOR" = 1 ] && [ "$sess" = 1 ]; then floors=(floor floor-sync); fi
  for t in direct "${floors[@]}" relaycar postfix; do run "$t" "$size" "$sess" "$warm"; done
  for r in $(seq 1 "$ROUNDS"); do
    run direct "$size" "$sess" "$count" "$r"
    for t in "${floors[@]}"; do run "$t" "$size" "$sess" "$count" "$r"; done
    if [ $((r % 2)) = 1 ]; then
      run relaycar "$size" "$sess" "$count" "$r"; run postfix "$size" "$sess" "$count" "$r"
    else
      run postfix "$size" "$sess" "$count" "$r"; run relaycar "$size" "$sess" "$count" "$r"
    fi
  done
  if [ "$lat_done" = 0 ] && [ "$size" = "$SMALL_SIZE" ] && [ "$sess" = 1 ] && [ "$LAT_COUNT" -gt 0 ]; then
    for r in $(seq 1 "$ROUNDS"); do lat_run relaycar "$r"; lat_run postfix "$r"; done
    lat_done=1
  fi
  echo "rss $size:$sess $(vmhwm_kb "$RELAY_PID")" >> "$RESULTS"
  stop_relay
done
ELAPSED=$((SECONDS - START))
stop_pid "$NEIGHBOUR_PID" 5; NEIGHBOUR_PID=""; rm -f "$WORK/neighbour.bin"

# ---- report ----------------------------------------------------------------------------
RELAY_VERSION=$(cd "$REPO" && git describe --tags --always --dirty 2>/dev/null || echo unknown)
echo
echo "relaycar $RELAY_VERSION vs Postfix $PF_VERSION; smtp-source, one connection per message;"
SPOOL_DEV=$(df --output=source "$WORK" | tail -1)
# jbd2 keeps a directory per journal it runs, named after the device.
SPOOL_JOURNAL="no journal"
if ls /proc/fs/jbd2/ 2>/dev/null | grep -q "^$(basename "$SPOOL_DEV")-"; then SPOOL_JOURNAL=journal; fi
echo "$(nproc) cores, $(uname -r), spool/queue on $SPOOL_DEV ($(df --output=fstype "$WORK" | tail -1), $SPOOL_JOURNAL);"
if [ "${NEIGHBOUR:-0}" = 1 ]; then echo "with a neighbour streaming writes (dd, no sync) into the same file system;"; fi
echo "sink counters in $COUNTS ($(df --output=fstype "$COUNTS" | tail -1));"
echo "medians of $ROUNDS rounds, msgs/s = messages / wall time of smtp-source;
measuring took ${ELAPSED}s, the whole script ${SECONDS}s so far"
echo
awk -v mixes="$MIXES" -v rounds="$ROUNDS" -v latn="$LAT_COUNT" '
function med(key,   n, i, j, t, v) {
  n = split(vals[key], v, " ")
  if (n == 0 || vals[key] == "") return -1
  for (i = 2; i <= n; i++) { t = v[i] + 0; for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
  return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
}
function add(key, x) { vals[key] = (key in vals) ? vals[key] " " x : x }
function commas(x,   s, r) {
  s = sprintf("%.0f", x); r = ""
  while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
  return s r
}
function rate(x) { return x < 0 ? "n/a" : commas(x) "/s" }
function ratio(a, b) { return (a < 0 || b <= 0) ? "n/a" : sprintf("%.2f", a / b) }
function label(m,   p) {
  split(m, p, ":")
  return (p[1] >= 1048576 && p[1] % 1048576 == 0 ? p[1] / 1048576 " MB" : \
          p[1] >= 1024 && p[1] % 1024 == 0 ? p[1] / 1024 " KB" : p[1] " B") " × " p[2]
}
$1 == "rss" { rss[$2] = $3; next }
$1 == "lat" {
  for (i = 4; i <= NF; i++) { split($i, kv, "="); add("lat " $2 " " kv[1], kv[2]) }
  next
}
{ add($1 " " $2 " acc", $4 / $5); if ($6 != "-") add($1 " " $2 " e2e", $4 / $6) }
END {
  n = split(mixes, M, " ")
  print "| mix | direct smtp-source → smtp-sink (ceiling) | relaycar accept | Postfix accept | relaycar / Postfix | relaycar / direct | relaycar peak RSS |"
  print "| --- | --- | --- | --- | --- | --- | --- |"
  for (i = 1; i <= n; i++) {
    split(M[i], p, ":"); m = p[1] ":" p[2]
    d = med(m " direct acc"); r = med(m " relaycar acc"); f = med(m " postfix acc")
    printf "| %s | %s | %s | %s | %s | %s | %s |\n", label(m), rate(d), rate(r), rate(f), ratio(r, f), ratio(r, d), \
      (m in rss) ? sprintf("%.1f MB", rss[m] / 1024) : "n/a"
  }
  print ""
  print "End to end (messages / time from smtp-source start until the sink has received them all):"
  print ""
  print "| mix | relaycar end-to-end | Postfix end-to-end | relaycar / Postfix |"
  print "| --- | --- | --- | --- |"
  for (i = 1; i <= n; i++) {
    split(M[i], p, ":"); m = p[1] ":" p[2]
    r = med(m " relaycar e2e"); f = med(m " postfix e2e")
    printf "| %s | %s | %s | %s |\n", label(m), rate(r), rate(f), ratio(r, f)
  }
  floored = 0
  for (i = 1; i <= n; i++) { split(M[i], p, ":"); if ((p[1] ":" p[2] " floor-sync acc") in vals) floored = 1 }
  if (floored) {
    print ""
    print "The go-smtp floor (tools/bench floor, one session): the library relaycar uses and nothing else,"
    print "answering 250 after writing each message over one preallocated file and fdatasyncing it (durable),"
    print "or discarding it:"
    print ""
    print "| mix | go-smtp, discards | go-smtp, durable | relaycar accept | relaycar / durable floor | durable floor / Postfix |"
    print "| --- | --- | --- | --- | --- | --- |"
    for (i = 1; i <= n; i++) {
      split(M[i], p, ":"); m = p[1] ":" p[2]
      if (!((m " floor-sync acc") in vals)) continue
      z = med(m " floor acc"); d = med(m " floor-sync acc"); r = med(m " relaycar acc"); f = med(m " postfix acc")
      printf "| %s | %s | %s | %s | %s | %s |\n", label(m), rate(z), rate(d), rate(r), ratio(r, d), ratio(d, f)
    }
  }
  if (("lat relaycar p99_ms") in vals) {
    print ""
    printf "Accept latency, tools/bench latency: %d × 2 KB messages sent one after another, one connection\n", latn
    print "each, connect → 250 after DATA (medians of the rounds'\'' percentiles):"
    print ""
    print "| target | p50 | p99 | max | msgs/s |"
    print "| --- | --- | --- | --- | --- |"
    split("relaycar postfix", T, " ")
    for (t = 1; t <= 2; t++) {
      printf "| %s | %.2f ms | %.2f ms | %.2f ms | %s |\n", T[t] == "postfix" ? "Postfix" : T[t], \
        med("lat " T[t] " p50_ms"), med("lat " T[t] " p99_ms"), med("lat " T[t] " max_ms"), commas(med("lat " T[t] " rate"))
    }
    printf "| relaycar / Postfix | %s | %s | | |\n", ratio(med("lat relaycar p50_ms"), med("lat postfix p50_ms")), \
      ratio(med("lat relaycar p99_ms"), med("lat postfix p99_ms"))
  }
  print ""
  print "Per round, accept msgs/s (direct / relaycar / Postfix):"
  for (i = 1; i <= n; i++) {
    split(M[i], p, ":"); m = p[1] ":" p[2]
    line = sprintf("  %-10s", label(m))
    split(vals[m " direct acc"], D, " "); split(vals[m " relaycar acc"], R, " "); split(vals[m " postfix acc"], F, " ")
    for (j = 1; j <= rounds; j++) line = line sprintf("  %s / %s / %s", commas(D[j]), commas(R[j]), commas(F[j]))
    print line
  }
}' "$RESULTS"
