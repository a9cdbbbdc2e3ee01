#!/usr/bin/env bash
# The registries in their production shape: per dc, DOCKVM_REGISTRY_REPLICAS Distribution
# instances on one S3 bucket (Ceph's RADOS Gateway, scripts/ceph.sh), behind HAProxy on the
# dc's usual address (dc1 127.0.0.1:5001, dc2 :5002). Production uses LVS/keepalived for the
# same job (deploy/registry-lb/); this kernel has no IPVS, hence HAProxy here.
#
#   registry.sh up      Ceph, the replicas, HAProxy (DOCKVM_REGISTRY_STORAGE=ceph, the default);
#                       with =filesystem it stops them and leaves the port to stack.sh's registry
#   registry.sh down    stop HAProxy, the replicas, Ceph; data stays in Ceph
#   registry.sh status  rows: ceph, each replica, each balanced address with HAProxy's view
#
# Replica i of dcN listens on 127.0.0.1:$((DOCKVM_REGISTRY_REPLICA_PORT_BASE + 10*N + i)).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

: "${DOCKVM_REGISTRY_REPLICAS:=2}"
: "${DOCKVM_REGISTRY_REPLICA_PORT_BASE:=5000}"
: "${DOCKVM_CEPH_RGW_PORT:=7480}"
: "${DOCKVM_S3_BUCKET_PREFIX:=dockvm-registry-}"

REG_DIR=$STATE/registry
HAPROXY_CFG=$REG_DIR/haproxy.cfg
HAPROXY_SOCK=$RUN_DIR/haproxy.sock
DCS=(dc1 dc2)

lb_port() { local v="DOCKVM_REGISTRY_${1^^}_PORT"; echo "${!v}"; }
replica_port() { echo $((DOCKVM_REGISTRY_REPLICA_PORT_BASE + 10 * ${1#dc} + $2)); }
replicas() { seq 1 "$DOCKVM_REGISTRY_REPLICAS"; }
v2_ok() { [[ $(http_code "http://$DOCKVM_HOST:$1/v2/") == 200 ]]; }

# http_secret: the key every replica of a dc signs upload state with, so that an upload begun
# on one replica continues on the other. Made once, 0600.
http_secret() {
  [[ -s $REG_DIR/http.secret ]] ||
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$REG_DIR/http.secret")
  chmod 0600 "$REG_DIR/http.secret"
  cat "$REG_DIR/http.secret"
}

TEMPLATES=$REPO_ROOT/deploy/registry

# replica_config DC I: the config of one replica (holds the S3 key and both secrets), from
# deploy/registry/replica.yml.in and notifications.yml.in.
replica_config() {
  local dc=$1 i=$2
  echo "# Written by scripts/registry.sh from deploy/registry/; edits are overwritten."
  DC=$dc REPLICA=r$i LOG_LEVEL=info S3_ACCESS_KEY=$DOCKVM_S3_ACCESS_KEY \
    S3_SECRET_KEY=$DOCKVM_S3_SECRET_KEY S3_ENDPOINT=http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT \
    S3_SECURE=false BUCKET=$DOCKVM_S3_BUCKET_PREFIX$dc ADDR=$DOCKVM_HOST:$(replica_port "$dc" "$i") \
    HTTP_SECRET=$HTTP_SECRET NOTIFY_URL=$DOCKVM_WEBHOOK_URL WEBHOOK_SECRET=$WEBHOOK_SECRET \
    NOTIFY_THRESHOLD=5 NOTIFY_BACKOFF=1s \
    render "$TEMPLATES/replica.yml.in" "$TEMPLATES/notifications.yml.in"
}

# haproxy_config: one frontend per dc on its usual address, one backend of its replicas
# (deploy/registry/haproxy.cfg.in, then haproxy-dc.cfg.in and the server lines of each dc).
haproxy_config() {
  local dc i
  echo "# Written by scripts/registry.sh from deploy/registry/; edits are overwritten."
  STATS_SOCKET=$HAPROXY_SOCK render "$TEMPLATES/haproxy.cfg.in"
  for dc in "${DCS[@]}"; do
    DC=$dc BIND=$DOCKVM_HOST:$(lb_port "$dc") render "$TEMPLATES/haproxy-dc.cfg.in"
    for i in $(replicas); do
      printf '  server r%s %s:%s check\n' "$i" "$DOCKVM_HOST" "$(replica_port "$dc" "$i")"
    done
  done
}

# write_config FILE TEXT: (re)writes FILE 0600; true when it changed.
write_config() {
  if [[ -f $1 && $(<"$1") == "$2" ]]; then chmod 0600 "$1"; return 1; fi
  (umask 077 && printf '%s\n' "$2" >"$1.tmp" && mv "$1.tmp" "$1")
}

# AWS_CA_BUNDLE (set on some machines) makes the registry's AWS SDK panic at start: it cannot
# load a bundle into Distribution's own HTTP transport. RGW is plain HTTP on loopback anyway.
replica_start() {
  local dc=$1 i=$2 name="registry-$1-r$2" conf=$REG_DIR/$1-r$2.yml port
  port=$(replica_port "$dc" "$i")
  if write_config "$conf" "$(replica_config "$dc" "$i")" && pid_alive "$RUN_DIR/$name.pid"; then
    say "registry: $name config changed; restarting it"
    stop_pidfile "$name"
  fi
  if ! pid_alive "$RUN_DIR/$name.pid" || ! v2_ok "$port"; then
    pid_alive "$RUN_DIR/$name.pid" || { say "registry: starting $name"; spawn "$name" env -u AWS_CA_BUNDLE docker-registry serve "$conf"; }
    wait_until 30 v2_ok "$port" ||
      die "$name: GET http://$DOCKVM_HOST:$port/v2/ not 200 after 30s (log: $LOG_DIR/$name.log)"
  fi
  # A replica logs its endpoints' headers (the webhook secret) as it starts.
  redact_in_logs "$WEBHOOK_SECRET" "$LOG_DIR/$name.log"
}

haproxy_start() {
  local dc
  if write_config "$HAPROXY_CFG" "$(haproxy_config)" && pid_alive "$RUN_DIR/haproxy.pid"; then
    say "registry: haproxy config changed; restarting it"
    stop_pidfile haproxy
  fi
  if ! pid_alive "$RUN_DIR/haproxy.pid"; then
    haproxy -c -q -f "$HAPROXY_CFG" || die "haproxy: $HAPROXY_CFG does not check"
    say "registry: starting haproxy"
    spawn haproxy haproxy -db -f "$HAPROXY_CFG"
  fi
  for dc in "${DCS[@]}"; do
    wait_until 30 v2_ok "$(lb_port "$dc")" ||
      die "haproxy: http://$DOCKVM_HOST:$(lb_port "$dc")/v2/ not 200 after 30s (log: $LOG_DIR/haproxy.log)"
  done
}

# The single-registry light mode (stack.sh) and this one use the same ports.
stop_filesystem_registries() {
  local dc
  for dc in "${DCS[@]}"; do
    if pid_alive "$RUN_DIR/registry-$dc.pid" &&
      grep -qs "addr: $DOCKVM_HOST:$(lb_port "$dc")\$" "$REG_DIR/$dc.yml"; then
      say "registry: stopping the filesystem registry $dc (DOCKVM_REGISTRY_STORAGE=ceph)"
      stop_pidfile "registry-$dc"
    fi
  done
}

stop_pair() {
  local dc i
  if pid_alive "$RUN_DIR/haproxy.pid"; then say "registry: stopping haproxy"; stop_pidfile haproxy; fi
  for dc in "${DCS[@]}"; do
    for i in $(replicas); do
      if pid_alive "$RUN_DIR/registry-$dc-r$i.pid"; then
        say "registry: stopping registry-$dc-r$i"
        stop_pidfile "registry-$dc-r$i"
      fi
    done
  done
}

cmd_up() {
  local dc i
  ensure_state_dirs
  if [[ $DOCKVM_REGISTRY_STORAGE == filesystem ]]; then
    # The light mode is for machines that cannot spare Ceph's memory: none of this runs.
    stop_pair
    "$REPO_ROOT/scripts/ceph.sh" down
    return 0
  fi
  [[ $DOCKVM_REGISTRY_STORAGE == ceph ]] ||
    die "DOCKVM_REGISTRY_STORAGE must be ceph or filesystem, not '$DOCKVM_REGISTRY_STORAGE'"
  stop_filesystem_registries
  "$REPO_ROOT/scripts/ceph.sh" up
  # shellcheck disable=SC1091 # made by ceph.sh up
  source "$STATE/ceph/s3.env"
  HTTP_SECRET=$(http_secret)
  WEBHOOK_SECRET=$(webhook_secret)
  for dc in "${DCS[@]}"; do
    for i in $(replicas); do replica_start "$dc" "$i"; done
  done
  haproxy_start
}

cmd_down() {
  mkdir -p "$RUN_DIR"
  stop_pair
  "$REPO_ROOT/scripts/ceph.sh" down
}

# haproxy_view: "dc server status" lines from HAProxy's stats socket.
haproxy_view() {
  python3 - "$HAPROXY_SOCK" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
for line in data.decode().splitlines()[1:]:
    f = line.split(",")
    if len(f) > 17 and f[1] not in ("FRONTEND", "BACKEND"):
        print(f[0], f[1], f[17])
PY
}

_row() { printf '%-13s %-46s %s\n' "$1" "$2" "$3"; }

cmd_status() {
  local rc=0 dc i port view
  "$REPO_ROOT/scripts/ceph.sh" status || rc=1
  view=$(haproxy_view) || view=""
  for dc in "${DCS[@]}"; do
    port=$(lb_port "$dc")
    if v2_ok "$port"; then
      _row "registry-$dc" "http://$DOCKVM_HOST:$port (haproxy)" \
        "up [$(awk -v d="$dc" '$1 == d { printf "%s%s %s", sep, $2, $3; sep=", " }' <<<"$view")]"
    else
      _row "registry-$dc" "http://$DOCKVM_HOST:$port (haproxy)" down; rc=1
    fi
    for i in $(replicas); do
      port=$(replica_port "$dc" "$i")
      if v2_ok "$port"; then _row "  $dc-r$i" "http://$DOCKVM_HOST:$port" up
      else _row "  $dc-r$i" "http://$DOCKVM_HOST:$port" down; rc=1; fi
    done
  done
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
