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

# replica_config DC I: the config of one replica (holds the S3 key and both secrets).
replica_config() {
  local dc=$1 i=$2
  cat <<EOF
# Written by scripts/registry.sh; edits are overwritten.
version: 0.1
log:
  level: info
  formatter: text
  fields:
    dc: $dc
    replica: r$i
storage:
  s3:
    accesskey: $DOCKVM_S3_ACCESS_KEY
    secretkey: $DOCKVM_S3_SECRET_KEY
    region: us-east-1
    regionendpoint: http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT
    forcepathstyle: true
    bucket: $DOCKVM_S3_BUCKET_PREFIX$dc
    secure: false
    v4auth: true
    rootdirectory: /registry
    # 32 MiB parts (default 10) and one server-side copy per commit up to 5 GiB instead of a
    # multipart copy: a 200 MB push 23% faster here (bench/registry.py, docs/benchmarks.md).
    chunksize: 33554432
    multipartcopythresholdsize: 5368709120
  delete:
    enabled: true
  # Blobs go through the replica (and the balancer), not to RGW by a presigned redirect.
  redirect:
    disable: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $DOCKVM_HOST:$(replica_port "$dc" "$i")
  secret: $HTTP_SECRET
  headers:
    X-Content-Type-Options: [nosniff]
notifications:
  events:
    includereferences: true
  endpoints:
    - name: imagesync
      url: $DOCKVM_WEBHOOK_URL
      headers:
        Authorization: [Bearer $WEBHOOK_SECRET]
        X-Dockvm-Dc: [$dc]
        X-Dockvm-Replica: [r$i]
      timeout: 2s
      threshold: 5
      backoff: 1s
      ignoredmediatypes:
        - application/octet-stream
EOF
}

# haproxy_config: one frontend per dc on its usual address, one backend of its replicas.
# Checks every 500 ms, 2 failures mark a replica down (~1 s after a kill -9); meanwhile a
# request whose connection is refused is sent again to the other replica (retries, redispatch).
haproxy_config() {
  local dc i
  cat <<EOF
# Written by scripts/registry.sh; edits are overwritten.
global
  maxconn 1024
  nbthread 2
  stats socket $HAPROXY_SOCK mode 600 level admin
defaults
  mode http
  log global
  option dontlognull
  timeout connect 2s
  timeout client 300s
  timeout server 300s
  timeout http-request 30s
  timeout check 1s
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response response-timeout
EOF
  for dc in "${DCS[@]}"; do
    printf '\nfrontend registry-%s\n  bind %s:%s\n  default_backend %s\n' \
      "$dc" "$DOCKVM_HOST" "$(lb_port "$dc")" "$dc"
    # By path: an upload's PATCH and PUT (…/uploads/<uuid>) go to one replica, and a blob's
    # reads to the one whose in-memory descriptor cache knows it (the other replica can take
    # either over from S3). Consistent hashing: a dead replica's share moves, the rest stays.
    printf '\nbackend %s\n  balance uri\n  hash-type consistent\n  option httpchk GET /v2/\n' "$dc"
    printf '  http-check expect status 200\n'
    printf '  default-server inter 500ms fastinter 250ms downinter 1s fall 2 rise 2\n'
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
