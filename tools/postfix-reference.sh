#!/usr/bin/env bash
# postfix-reference.sh — measure Postfix's durable accept rate on this machine,
# as a reference point for relaycar's accept benchmarks.
#
# What it does (loopback only, bounded in time):
#   1. installs postfix (Debian package, "No configuration") if missing;
#   2. writes a private Postfix instance config in $PF_CONF (default
#      /etc/postfix-relaycar-ref) with its own queue in $PF_QUEUE: smtpd listens
#      ONLY on 127.0.0.1:$PORT, relays for 127.0.0.0/8, and every transport is
#      discard: — a message is written to the queue (cleanup fsyncs the queue
#      file before smtpd answers 250) and then thrown away; nothing ever leaves
#      the machine;
#   3. starts it, runs smtp-source at 1, 8 and 32 parallel sessions with 2 KB
#      bodies, $RUNS times each, and prints msgs/s = messages / wall seconds;
#   4. stops it (also on error / Ctrl-C).
#
# Env knobs:
#   PORT=2526  RUNS=2  SIZE=2048  MODE=reuse|new  (reuse: smtp-source -d, many
#   messages per connection; new: one connection per message)
#   LEVELS="1:1000 8:3000 32:6000"  (sessions:messages)
#   RUN_TIMEOUT=120 (seconds per smtp-source run)
#   KEEP=1 leaves the instance running at the end.
set -euo pipefail

PORT=${PORT:-2526}
RUNS=${RUNS:-2}
SIZE=${SIZE:-2048}
MODE=${MODE:-reuse}
LEVELS=${LEVELS:-"1:1000 8:3000 32:6000"}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
PF_CONF=${PF_CONF:-/etc/postfix-relaycar-ref}
PF_QUEUE=${PF_QUEUE:-/var/spool/postfix-relaycar-ref}
PF_DATA=${PF_DATA:-/var/lib/postfix-relaycar-ref}
PF_LOG=${PF_LOG:-/var/log/postfix-relaycar-ref.log}

if [ "$(id -u)" != 0 ]; then
  echo "must run as root (postfix needs it)" >&2
  exit 2
fi

# ---- 1. install ------------------------------------------------------------
if ! command -v postfix >/dev/null 2>&1 || [ ! -x /usr/sbin/smtp-source ]; then
  echo "installing postfix ..." >&2
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q postfix >/dev/null
fi
SMTP_SOURCE=/usr/sbin/smtp-source

# ---- 2. config -------------------------------------------------------------
mkdir -p "$PF_CONF" "$PF_DATA" "$PF_QUEUE"
chown postfix:postfix "$PF_DATA"
cat > "$PF_CONF/main.cf" <<EOF
# relaycar reference instance — written by tools/postfix-reference.sh
compatibility_level = 3.6
config_directory = $PF_CONF
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
myhostname = postfix-ref.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
# every delivery is discarded: nothing leaves this machine
default_transport = discard:relaycar-ref
relay_transport = discard:relaycar-ref
local_transport = discard:relaycar-ref
virtual_transport = discard:relaycar-ref
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtpd_banner = \$myhostname ESMTP
message_size_limit = 10240000
maillog_file = $PF_LOG
# postfix defaults, spelled out for the record
smtpd_client_connection_count_limit = 50
default_process_limit = 100
EOF

# master.cf: the Debian default minus the port-25 listener, plus ours.
# chroot off so the private queue dir needs no copied /etc files.
awk -v port="$PORT" '
  /^smtp[ \t]+inet/ { print "127.0.0.1:" port " inet n - n - - smtpd"; next }
  /^#/ || /^[ \t]*$/ { print; next }
  { if ($5 == "y") $5 = "n"; print }
' /usr/share/postfix/master.cf.dist > "$PF_CONF/master.cf"
postfix -c "$PF_CONF" check >/dev/null 2>&1 || postfix -c "$PF_CONF" check

stop_pf() {
  if postfix -c "$PF_CONF" status >/dev/null 2>&1; then
    postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
  fi
}
if [ "${KEEP:-0}" != 1 ]; then trap stop_pf EXIT; fi

stop_pf
if ! postfix -c "$PF_CONF" start >/dev/null 2>&1; then
  echo "postfix start failed; last log lines:" >&2
  tail -5 "$PF_LOG" >&2
  exit 1
fi
for _ in $(seq 1 50); do
  if (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null; then break; fi
  sleep 0.2
done
if ! (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null; then
  echo "postfix did not start listening on 127.0.0.1:$PORT; see $PF_LOG" >&2
  exit 1
fi

# ---- 3. measure ------------------------------------------------------------
reuse_flag=()
if [ "$MODE" = reuse ]; then reuse_flag=(-d); fi

echo "# postfix $(postconf -c "$PF_CONF" -h mail_version) on $(nproc) cores, body=${SIZE}B, mode=$MODE (smtp-source ${reuse_flag[*]:-no -d})"
printf '%-9s %-6s %-9s %-9s %-9s\n' sessions run messages seconds msgs/s
# warm-up (process spawn, caches), not reported
timeout "$RUN_TIMEOUT" "$SMTP_SOURCE" "${reuse_flag[@]}" -s 4 -m 200 -l "$SIZE" \
  -f load@example.com -t sink@example.net -M client.localdomain 127.0.0.1:"$PORT"
sleep 1
for lv in $LEVELS; do
  sess=${lv%%:*}; msgs=${lv##*:}
  for run in $(seq 1 "$RUNS"); do
    t0=$(date +%s.%N)
    timeout "$RUN_TIMEOUT" "$SMTP_SOURCE" "${reuse_flag[@]}" -s "$sess" -m "$msgs" \
      -l "$SIZE" -f load@example.com -t sink@example.net -M client.localdomain \
      127.0.0.1:"$PORT"
    t1=$(date +%s.%N)
    awk -v s="$sess" -v r="$run" -v m="$msgs" -v a="$t0" -v b="$t1" \
      'BEGIN { d = b - a; printf "%-9s %-6s %-9s %-9.2f %-9.0f\n", s, r, m, d, m / d }'
    # let the queue manager drain the discards so runs do not overlap
    for _ in $(seq 1 100); do
      n=$(find "$PF_QUEUE"/incoming "$PF_QUEUE"/active "$PF_QUEUE"/deferred -type f 2>/dev/null | wc -l)
      [ "$n" = 0 ] && break
      sleep 0.2
    done
  done
done
