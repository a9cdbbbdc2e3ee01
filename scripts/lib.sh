# shellcheck shell=bash
# Shared by the scripts in this folder: the environment of the local stack and the helpers that
# start, probe and stop background processes. Sourced, never run.

# Every setting has a default and can be overridden from the environment.
: "${DOCKVM_STATE_DIR:=/var/lib/dockvm}"
: "${DOCKVM_HOST:=127.0.0.1}"
: "${DOCKVM_RABBITMQ_PORT:=5672}"
: "${DOCKVM_RABBITMQ_MGMT_PORT:=15672}"
: "${DOCKVM_RABBITMQ_NODENAME:=rabbit}"
: "${DOCKVM_FERRETDB_PORT:=27017}"
: "${DOCKVM_FERRETDB_DEBUG_ADDR:=127.0.0.1:8088}"
: "${DOCKVM_REGISTRY_DC1_PORT:=5001}"
: "${DOCKVM_REGISTRY_DC2_PORT:=5002}"
# ceph: per dc, two Distribution replicas on Ceph's S3 behind HAProxy (scripts/registry.sh);
# filesystem: one registry per dc on a local directory (light mode, no Ceph's memory).
: "${DOCKVM_REGISTRY_STORAGE:=ceph}"
: "${DOCKVM_WEBHOOK_URL:=http://127.0.0.1:8081/v1/registry-events}"
: "${DOCKVM_LXCFS_DIR:=/var/lib/lxcfs}"
: "${DOCKVM_BASE_IMAGE:=dockvm/base:bookworm}"
: "${DOCKVM_START_TIMEOUT:=90}"
# Docker hosts of the local datacenter (scripts/hosts.sh): h1..hN, each its own engine on the
# OVS fabric, with their agents started by services.sh. 1: the main engine (host local1) alone.
: "${DOCKVM_HOSTS:=3}"
export DOCKVM_STATE_DIR

# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$DOCKVM_STATE_DIR
LOG_DIR=$STATE/log
RUN_DIR=$STATE/run

# Go and the Debian sbin tools are not on every caller's PATH (CI starts from a bare one).
export PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

say() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
# die prints the one line a failed step owes its caller, then exits non-zero.
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The state holds secrets (admin.token, webhook.secret, the registries' configs, the database),
# so it and its log, run, registry and database directories are its owner's alone. The chmod
# runs every time, so that a state dir made before this rule (0755) is fixed too.
PRIVATE_DIRS=("$STATE" "$LOG_DIR" "$RUN_DIR" "$STATE/registry" "$STATE/ferretdb")

ensure_state_dirs() {
  (umask 077 && mkdir -p "${PRIVATE_DIRS[@]}")
  chmod 0700 "${PRIVATE_DIRS[@]}"
  mkdir -p "$STATE/registry/dc1" "$STATE/registry/dc2" "$STATE/volumes" "$STATE/cache"
  # Gateways before issue 21 printed the admin token into their log.
  [[ ! -s $STATE/admin.token ]] || redact_in_logs "$(<"$STATE/admin.token")" "$LOG_DIR/gateway.log"
}

# redact_in_logs SECRET LOG...: overwrites every copy of SECRET in the LOGs with x's, in place
# (same inode and length, so a process still appending loses nothing). The secret goes through
# the environment: a command line is world-readable in /proc.
redact_in_logs() {
  local secret=$1; shift
  [[ -n $secret ]] || return 0
  DOCKVM_REDACT=$secret python3 - "$@" <<'PY'
import mmap, os, sys
secret = os.environ["DOCKVM_REDACT"].encode()
for name in sys.argv[1:]:
    if not os.path.isfile(name) or os.path.getsize(name) == 0:
        continue
    with open(name, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(secret)
        while at >= 0:
            m[at : at + len(secret)] = b"x" * len(secret)
            at = m.find(secret, at)
PY
}

# webhook_secret: the bearer secret the registries send imagesync, made once (0600).
webhook_secret() {
  if [[ -n ${DOCKVM_WEBHOOK_SECRET:-} ]]; then
    printf '%s' "$DOCKVM_WEBHOOK_SECRET"
    return
  fi
  if [[ ! -s $STATE/webhook.secret ]]; then
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/webhook.secret")
  fi
  chmod 0600 "$STATE/webhook.secret"
  cat "$STATE/webhook.secret"
}

# tcp_open HOST PORT: true if something accepts a TCP connection there.
tcp_open() { timeout 2 bash -c ">/dev/tcp/$1/$2" 2>/dev/null; }

# render TEMPLATE...: the templates (deploy/...) one after another, their ${NAME} placeholders
# filled from the environment; only the names they use are replaced, so a stray $ stays.
render() {
  local names
  names=$(cat "$@" | grep -o '\${[A-Z0-9_]*}' | sort -u | tr -d '\n')
  cat "$@" | envsubst "$names"
}

# http_code URL [curl args...]: the status code, or 000 when nothing answers.
http_code() {
  local url=$1; shift
  curl -s -o /dev/null -m 3 -w '%{http_code}' "$@" "$url" 2>/dev/null || true
}

# wait_until SECONDS CMD...: polls CMD every half second; false when time runs out.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# _starttime PID: the process's start time in clock ticks since boot (field 22 of stat).
_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086 # split into fields on purpose
  set -- $stat
  echo "${20}"
}

# pid_alive PIDFILE: true if the file names a running process. A file written by spawn also
# holds the start time, so that a pid reused by another process after a reboot does not count.
pid_alive() {
  local pid start
  [[ -s $1 ]] || return 1
  read -r pid start <"$1" || true
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ -z $start || $(_starttime "$pid") == "$start" ]]
}

# spawn NAME CMD...: runs CMD detached in its own session, logging to $LOG_DIR/NAME.log and
# recording "pid starttime" in $RUN_DIR/NAME.pid, so that it outlives the calling shell.
spawn() {
  local name=$1 pid; shift
  # The log is made 0600; the process keeps the caller's umask for what it creates.
  (umask 077 && : >>"$LOG_DIR/$name.log")
  setsid "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
  pid=$!
  echo "$pid $(_starttime "$pid")" >"$RUN_DIR/$name.pid"
}

# stop_pidfile NAME [SECONDS]: SIGTERM the process of $RUN_DIR/NAME.pid, wait, then SIGKILL.
stop_pidfile() {
  local name=$1 grace=${2:-20} file="$RUN_DIR/$1.pid" pid
  if ! pid_alive "$file"; then
    rm -f "$file"
    return 0
  fi
  read -r pid _ <"$file"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until "$grace" _gone "$pid"; then
    warn "$name (pid $pid) ignored SIGTERM for ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}
_gone() { ! kill -0 "$1" 2>/dev/null; }
