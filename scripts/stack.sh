#!/usr/bin/env bash
# The local stack: RabbitMQ, FerretDB, the Docker Engine, two registries, LXCFS, Open vSwitch,
# Prometheus and Alertmanager, the base image and the local Maven repository
# (scripts/maven-repo.sh), all on loopback, without systemd.
#
#   stack.sh up      start what does not answer yet (a second run is a no-op)
#   stack.sh down    stop what `up` started (its pid files); data stays
#   stack.sh status  component / address / up|down
#   stack.sh clean   down, then remove $DOCKVM_STATE_DIR (asks nothing)
#
# A component that answers is left alone, whoever started it. Only the processes named in
# $DOCKVM_STATE_DIR/run are stopped by `down`.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

OVS_RUN=/var/run/openvswitch
# RabbitMQ runs as the rabbitmq user, which cannot enter the private state dir: its config
# (addresses only, no secret) lives beside Debian's own.
RABBITMQ_CONF=/etc/rabbitmq/dockvm-$DOCKVM_RABBITMQ_NODENAME.conf

amqp_addr() { echo "$DOCKVM_HOST:$DOCKVM_RABBITMQ_PORT"; }
mgmt_url() { echo "http://$DOCKVM_HOST:$DOCKVM_RABBITMQ_MGMT_PORT"; }
registry_port() { local v="DOCKVM_REGISTRY_${1^^}_PORT"; echo "${!v}"; }

# --- RabbitMQ -------------------------------------------------------------------------------

rabbitmq_ctl() { timeout 60 rabbitmqctl -n "$DOCKVM_RABBITMQ_NODENAME" "$@"; }
rabbitmq_mgmt_up() { [[ $(http_code "$(mgmt_url)/api/overview" -u guest:guest) == 200 ]]; }
rabbitmq_up() { tcp_open "$DOCKVM_HOST" "$DOCKVM_RABBITMQ_PORT" && rabbitmq_mgmt_up; }

# rabbitmq_launch starts the node without waiting: it is the slowest component, so the others
# start meanwhile and rabbitmq_wait collects it at the end.
rabbitmq_launch() {
  RABBITMQ_LAUNCHED=0
  if rabbitmq_up; then
    return
  fi
  if tcp_open "$DOCKVM_HOST" "$DOCKVM_RABBITMQ_PORT"; then
    # A node that answers AMQP but lacks the management API was started by someone else
    # without the plugin; enabling it online is all it needs.
    say "stack: rabbitmq answers without the management API; enabling rabbitmq_management"
    timeout 60 rabbitmq-plugins -n "$DOCKVM_RABBITMQ_NODENAME" enable rabbitmq_management >>"$LOG_DIR/rabbitmq.log" 2>&1 ||
      die "rabbitmq: could not enable rabbitmq_management (log: $LOG_DIR/rabbitmq.log)"
    RABBITMQ_LAUNCHED=1
    return
  fi
  if ! grep -qs rabbitmq_management /etc/rabbitmq/enabled_plugins; then
    timeout 60 rabbitmq-plugins enable --offline rabbitmq_management >>"$LOG_DIR/rabbitmq.log" 2>&1 ||
      die "rabbitmq: could not enable rabbitmq_management (log: $LOG_DIR/rabbitmq.log)"
  fi
  mkdir -p "$(dirname "$RABBITMQ_CONF")"
  cat >"$RABBITMQ_CONF" <<EOF
listeners.tcp.default = $DOCKVM_HOST:$DOCKVM_RABBITMQ_PORT
management.tcp.ip = $DOCKVM_HOST
management.tcp.port = $DOCKVM_RABBITMQ_MGMT_PORT
loopback_users.guest = true
EOF
  chmod 0644 "$RABBITMQ_CONF"
  say "stack: starting rabbitmq"
  # Debian's wrapper drops to the rabbitmq user with su, which keeps these variables.
  RABBITMQ_NODENAME=$DOCKVM_RABBITMQ_NODENAME RABBITMQ_CONFIG_FILE=$RABBITMQ_CONF \
    RABBITMQ_NODE_PORT=$DOCKVM_RABBITMQ_PORT RABBITMQ_DIST_PORT=$((DOCKVM_RABBITMQ_PORT + 20000)) \
    RABBITMQ_LOGS=- ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    spawn rabbitmq /usr/sbin/rabbitmq-server
  RABBITMQ_LAUNCHED=2
}

# rabbitmq_up_or_dead: stops the wait early when the node we spawned has already exited.
rabbitmq_up_or_dead() {
  rabbitmq_up || { ((RABBITMQ_LAUNCHED == 2)) && ! pid_alive "$RUN_DIR/rabbitmq.pid"; }
}

rabbitmq_wait() {
  ((RABBITMQ_LAUNCHED)) || return 0
  wait_until "$DOCKVM_START_TIMEOUT" rabbitmq_up_or_dead || true
  rabbitmq_up ||
    die "rabbitmq: did not come up on $(amqp_addr) and $(mgmt_url) within ${DOCKVM_START_TIMEOUT}s (log: $LOG_DIR/rabbitmq.log)"
}

# The node runs in a session of its own under su, so the wrapper's pid is not enough: the pid
# file only marks the node as ours, and rabbitmqctl stops it.
rabbitmq_down() {
  [[ -f $RUN_DIR/rabbitmq.pid ]] || return 0
  say "stack: stopping rabbitmq"
  if tcp_open "$DOCKVM_HOST" "$DOCKVM_RABBITMQ_PORT"; then
    rabbitmq_ctl stop >>"$LOG_DIR/rabbitmq.log" 2>&1 || warn "rabbitmqctl stop failed (log: $LOG_DIR/rabbitmq.log)"
  fi
  stop_pidfile rabbitmq 30
}

# --- FerretDB -------------------------------------------------------------------------------

ferretdb_up() { tcp_open "$DOCKVM_HOST" "$DOCKVM_FERRETDB_PORT"; }

# A database file that a crash left half-created (no FerretDB metadata table) stops FerretDB
# from starting at all; it holds no data, so it is moved aside with a warning.
ferretdb_quarantine() {
  local f
  while read -r f; do
    [[ -n $f ]] || continue
    warn "ferretdb: moving half-created database $f to $STATE/ferretdb/broken/"
    mkdir -p "$STATE/ferretdb/broken"
    mv "$f" "$f"-wal "$f"-shm "$STATE/ferretdb/broken/" 2>/dev/null || true
  done < <(python3 - "$STATE/ferretdb" <<'PY'
import pathlib, sqlite3, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.sqlite")):
    try:
        with sqlite3.connect(f"file:{f}?mode=ro", uri=True) as c:
            ok = c.execute("select 1 from sqlite_master where name = '_ferretdb_collections'").fetchone()
    except sqlite3.Error:
        ok = None
    if not ok:
        print(f)
PY
  )
}

ferretdb_start() {
  if [[ -n ${DOCKVM_MONGO_URL:-} ]] || ferretdb_up; then
    return
  fi
  ferretdb_quarantine
  command -v ferretdb >/dev/null || die "ferretdb: not installed; run scripts/install.sh (log: $LOG_DIR/ferretdb.log)"
  say "stack: starting ferretdb"
  spawn ferretdb ferretdb --handler=sqlite --sqlite-url="file:$STATE/ferretdb/" \
    --state-dir="$STATE/ferretdb" --listen-addr="$DOCKVM_HOST:$DOCKVM_FERRETDB_PORT" \
    --debug-addr="$DOCKVM_FERRETDB_DEBUG_ADDR" --telemetry=disable
  wait_until 30 ferretdb_up ||
    die "ferretdb: not answering on $DOCKVM_HOST:$DOCKVM_FERRETDB_PORT after 30s (log: $LOG_DIR/ferretdb.log)"
}

# --- Docker Engine --------------------------------------------------------------------------

docker_up() { timeout 10 docker info >/dev/null 2>&1; }

docker_start() {
  local pid
  docker_up && return
  # A dockerd killed without cleanup leaves its pid file; dockerd refuses to start while that pid
  # is alive, even when it has been reused by another program.
  if [[ -s /var/run/docker.pid ]]; then
    pid=$(</var/run/docker.pid)
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
      # Someone else's dockerd, perhaps still starting: wait for it rather than start another.
      wait_until 60 docker_up && return
      die "docker: dockerd (pid $pid) runs but does not answer docker info after 60s"
    fi
    rm -f /var/run/docker.pid
  fi
  say "stack: starting dockerd"
  spawn dockerd dockerd --storage-driver overlay2
  wait_until 60 docker_up ||
    die "docker: dockerd not answering on /var/run/docker.sock after 60s (log: $LOG_DIR/dockerd.log)"
}

# --- Registries -----------------------------------------------------------------------------

# The light mode's single registry per dc (DOCKVM_REGISTRY_STORAGE=filesystem); the default
# (Ceph, replicas, HAProxy) is scripts/registry.sh.

registry_config() {
  local dc=$1 secret=$2 templates=$REPO_ROOT/deploy/registry
  echo "# Written by scripts/stack.sh from deploy/registry/; edits are overwritten."
  DC=$dc REPLICA=r1 LOG_LEVEL=info ROOT=$STATE/registry/$dc \
    ADDR=$DOCKVM_HOST:$(registry_port "$dc") NOTIFY_URL=$DOCKVM_WEBHOOK_URL \
    WEBHOOK_SECRET=$secret NOTIFY_THRESHOLD=5 NOTIFY_BACKOFF=1s \
    render "$templates/filesystem.yml.in" "$templates/notifications.yml.in"
}

registry_up() { [[ $(http_code "http://$DOCKVM_HOST:$(registry_port "$1")/v2/") == 200 ]]; }

registry_start() {
  local dc=$1 conf=$STATE/registry/$1.yml new secret
  secret=$(webhook_secret)
  new=$(registry_config "$dc" "$secret")
  if [[ ! -f $conf || $(<"$conf") != "$new" ]]; then
    (umask 077 && printf '%s\n' "$new" >"$conf")
    # A registry of ours running on an old config is restarted to pick up the new one.
    if pid_alive "$RUN_DIR/registry-$dc.pid"; then
      say "stack: registry $dc config changed; restarting it"
      stop_pidfile "registry-$dc"
    fi
  fi
  # It holds the webhook secret; a config written before that rule may be 0644.
  chmod 0600 "$conf"
  if ! registry_up "$dc"; then
    say "stack: starting registry $dc"
    spawn "registry-$dc" docker-registry serve "$conf"
    wait_until 30 registry_up "$dc" ||
      die "registry-$dc: GET http://$DOCKVM_HOST:$(registry_port "$dc")/v2/ not 200 after 30s (log: $LOG_DIR/registry-$dc.log)"
  fi
  # The registry logs its endpoints' headers, the secret with them, as it starts (before it
  # answers), so the line is already written here.
  redact_in_logs "$secret" "$LOG_DIR/registry-$dc.log"
}

# --- LXCFS (optional) -----------------------------------------------------------------------

lxcfs_up() { grep -qs " $DOCKVM_LXCFS_DIR fuse.lxcfs " /proc/mounts && [[ -r $DOCKVM_LXCFS_DIR/proc/meminfo ]]; }

lxcfs_start() {
  lxcfs_up && return 0
  if grep -qs " $DOCKVM_LXCFS_DIR " /proc/mounts; then
    # The daemon behind this mount is gone (a restart, a killed session): clear the dead mount.
    umount -l "$DOCKVM_LXCFS_DIR" 2>/dev/null || true
  fi
  if ! command -v lxcfs >/dev/null; then
    warn "lxcfs: not installed; containers will see the host's /proc (log: $LOG_DIR/lxcfs.log)"
    return 0
  fi
  say "stack: starting lxcfs"
  mkdir -p "$DOCKVM_LXCFS_DIR"
  # -l virtualises loadavg and --enable-cfs the CPU count, so that top and nproc show limits.
  # lxcfs locks a pid file of its own; ours is written by spawn.
  spawn lxcfs lxcfs -f -l --enable-cfs -p "$RUN_DIR/lxcfs.lock" "$DOCKVM_LXCFS_DIR"
  if ! wait_until 15 lxcfs_up; then
    warn "lxcfs: could not mount $DOCKVM_LXCFS_DIR; going on without it (log: $LOG_DIR/lxcfs.log)"
    stop_pidfile lxcfs 5
  fi
}

lxcfs_down() {
  pid_alive "$RUN_DIR/lxcfs.pid" || { rm -f "$RUN_DIR/lxcfs.pid"; return 0; }
  say "stack: stopping lxcfs"
  stop_pidfile lxcfs 10
  if grep -qs " $DOCKVM_LXCFS_DIR " /proc/mounts; then
    umount -l "$DOCKVM_LXCFS_DIR" 2>/dev/null || true
  fi
}

# --- Open vSwitch, userspace datapath (optional) --------------------------------------------

ovs_up() {
  timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1 &&
    timeout 5 ovs-appctl -t ovs-vswitchd version >/dev/null 2>&1
}

ovs_start() {
  ovs_up && return 0
  if ! command -v ovs-vswitchd >/dev/null; then
    warn "ovs: not installed; the ovs network driver is unavailable (log: $LOG_DIR/ovs-vswitchd.log)"
    return 0
  fi
  say "stack: starting openvswitch (userspace datapath)"
  if ! _ovs_start; then
    warn "ovs: could not start; the ovs network driver is unavailable (logs: $LOG_DIR/ovsdb-server.log, $LOG_DIR/ovs-vswitchd.log)"
  fi
  return 0
}

# The default pid files in /var/run/openvswitch are kept so that ovs-appctl -t NAME works; the
# links in $RUN_DIR mark them as ours for `down`.
_ovs_start() {
  local db=$STATE/ovs/conf.db schema=/usr/share/openvswitch/vswitch.ovsschema
  mkdir -p "$OVS_RUN" "$STATE/ovs"
  if [[ ! -f $db ]]; then
    ovsdb-tool create "$db" "$schema" || return 1
  elif [[ $(ovsdb-tool needs-conversion "$db" "$schema") == yes ]]; then
    ovsdb-tool convert "$db" "$schema" || return 1
  fi
  if ! timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
    ovsdb-server "$db" --remote="punix:$OVS_RUN/db.sock" \
      --remote=db:Open_vSwitch,Open_vSwitch,manager_options \
      --pidfile="$OVS_RUN/ovsdb-server.pid" --log-file="$LOG_DIR/ovsdb-server.log" -vconsole:off 2>>"$LOG_DIR/ovsdb-server.log" \
      --detach || return 1
    ln -sf "$OVS_RUN/ovsdb-server.pid" "$RUN_DIR/ovsdb-server.pid"
    ovs-vsctl --timeout=10 --no-wait init || return 1
    if [[ -z $(ovs-vsctl --timeout=10 get Open_vSwitch . external_ids:system-id 2>/dev/null | tr -d '"') ]]; then
      ovs-vsctl --timeout=10 --no-wait set Open_vSwitch . "external_ids:system-id=$(cat /proc/sys/kernel/random/uuid)"
    fi
  fi
  ovs-vswitchd "unix:$OVS_RUN/db.sock" --pidfile="$OVS_RUN/ovs-vswitchd.pid" \
    --log-file="$LOG_DIR/ovs-vswitchd.log" -vconsole:off --detach 2>>"$LOG_DIR/ovs-vswitchd.log" || return 1
  ln -sf "$OVS_RUN/ovs-vswitchd.pid" "$RUN_DIR/ovs-vswitchd.pid"
  wait_until 15 ovs_up || return 1
  # Proves the netdev datapath works here: there is no kernel module to fall back on.
  ovs-vsctl --timeout=10 -- --may-exist add-br dockvm-probe -- set bridge dockvm-probe datapath_type=netdev &&
    ovs-vsctl --timeout=10 del-br dockvm-probe
}

ovs_down() {
  local name
  for name in ovs-vswitchd ovsdb-server; do
    if pid_alive "$RUN_DIR/$name.pid"; then
      say "stack: stopping $name"
      stop_pidfile "$name" 10
    fi
    rm -f "$RUN_DIR/$name.pid"
  done
}

# --- Base image -----------------------------------------------------------------------------

base_image_up() { docker image inspect "$DOCKVM_BASE_IMAGE" >/dev/null 2>&1; }

base_image_build() {
  "$REPO_ROOT/scripts/base-image.sh" build ||
    die "base-image: building $DOCKVM_BASE_IMAGE failed (log: $LOG_DIR/base-image.log)"
}

# --- Prometheus and Alertmanager (Debian's binaries, not their units) ------------------------

: "${DOCKVM_PROM_PORT:=9090}"
: "${DOCKVM_ALERTMANAGER_PORT:=9093}"
: "${DOCKVM_PROM_RETENTION:=8d}"
: "${DOCKVM_PROM_SCRAPE_INTERVAL:=10s}"
: "${DOCKVM_GATEWAY_URL:=http://127.0.0.1:${DOCKVM_GATEWAY_PORT:-8080}}"
# Empty: alerts go to the gateway's audit log. Ops set their own receiver here.
: "${DOCKVM_ALERT_WEBHOOK_URL:=}"
PROM_DIR=$STATE/prometheus
PROM_TEMPLATES=$REPO_ROOT/deploy/prometheus

prom_url() { echo "http://$DOCKVM_HOST:$DOCKVM_PROM_PORT"; }
am_url() { echo "http://$DOCKVM_HOST:$DOCKVM_ALERTMANAGER_PORT"; }
prom_up() { [[ $(http_code "$(prom_url)/-/ready") == 200 ]]; }
am_up() { [[ $(http_code "$(am_url)/-/ready") == 200 ]]; }

# The credential both present to the gateway (0600, in a 0700 dir): it reads the targets and
# posts alerts, nothing else; the gateway reads the same file.
prom_secret() {
  (umask 077 && mkdir -p "$PROM_DIR" "$PROM_DIR/data" "$PROM_DIR/alertmanager")
  chmod 0700 "$PROM_DIR"
  if [[ ! -s $PROM_DIR/gateway.secret ]]; then
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$PROM_DIR/gateway.secret")
  fi
  chmod 0600 "$PROM_DIR/gateway.secret"
}

# prom_render TEMPLATE: the config from deploy/prometheus/TEMPLATE. The rules' hash is part of
# Prometheus's, so that a changed rule restarts it like a changed config.
prom_render() {
  local webhook=${DOCKVM_ALERT_WEBHOOK_URL:-$DOCKVM_GATEWAY_URL/v1/prometheus/alerts} auth
  auth="s|@GATEWAY_AUTH@|authorization|"
  [[ -z ${DOCKVM_ALERT_WEBHOOK_URL:-} ]] || auth='/@GATEWAY_AUTH@/,$d'
  sed -e "s|@SCRAPE_INTERVAL@|$DOCKVM_PROM_SCRAPE_INTERVAL|g" -e "s|@SD_REFRESH@|10s|g" \
    -e "s|@INSTANCE@|$DOCKVM_HOST:$DOCKVM_PROM_PORT|g" \
    -e "s|@RULES_DIR@|$PROM_TEMPLATES/rules|g" \
    -e "s|@ALERTMANAGER@|$DOCKVM_HOST:$DOCKVM_ALERTMANAGER_PORT|g" \
    -e "s|@GATEWAY_URL@|$DOCKVM_GATEWAY_URL|g" -e "s|@WEBHOOK_URL@|$webhook|g" \
    -e "s|@SECRET_FILE@|$PROM_DIR/gateway.secret|g" -e "$auth" "$PROM_TEMPLATES/$1"
  [[ $1 != prometheus.yml.in ]] || echo "# rules: $(cat "$PROM_TEMPLATES"/rules/*.yml | sha256sum | cut -d' ' -f1)"
}

# prom_daemon NAME CHECK CONF TEMPLATE CMD...: (re)writes CONF; a daemon of ours on an older
# config is restarted; one that does not answer is started. History stays in the data dir.
prom_daemon() {
  local name=$1 check=$2 conf=$3 template=$4 new; shift 4
  new=$(prom_render "$template")
  if [[ ! -f $conf || $(<"$conf") != "$new" ]]; then
    (umask 077 && printf '%s\n' "$new" >"$conf")
    if pid_alive "$RUN_DIR/$name.pid"; then
      say "stack: $name config changed; restarting it"
      stop_pidfile "$name" 30
    fi
  fi
  "$check" && return 0
  command -v "$1" >/dev/null || die "$name: $1 not installed; run scripts/install.sh"
  say "stack: starting $name"
  spawn "$name" "$@"
  wait_until 60 "$check" || die "$name: not ready on $DOCKVM_HOST after 60s (log: $LOG_DIR/$name.log)"
}

prometheus_start() {
  prom_secret
  prom_daemon alertmanager am_up "$PROM_DIR/alertmanager.yml" alertmanager.yml.in \
    prometheus-alertmanager --config.file="$PROM_DIR/alertmanager.yml" \
    --storage.path="$PROM_DIR/alertmanager" \
    --web.listen-address="$DOCKVM_HOST:$DOCKVM_ALERTMANAGER_PORT" --cluster.listen-address=
  prom_daemon prometheus prom_up "$PROM_DIR/prometheus.yml" prometheus.yml.in \
    prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time="$DOCKVM_PROM_RETENTION" \
    --web.listen-address="$DOCKVM_HOST:$DOCKVM_PROM_PORT"
}

prometheus_down() {
  local name
  for name in prometheus alertmanager; do
    if pid_alive "$RUN_DIR/$name.pid"; then
      say "stack: stopping $name"
      stop_pidfile "$name" 30
    fi
  done
}

# --- Commands -------------------------------------------------------------------------------

cmd_up() {
  local t0=$SECONDS
  ensure_state_dirs
  rabbitmq_launch
  ferretdb_start
  docker_start
  "$REPO_ROOT/scripts/registry.sh" up
  if [[ $DOCKVM_REGISTRY_STORAGE == filesystem ]]; then registry_start dc1; registry_start dc2; fi
  lxcfs_start
  ovs_start
  prometheus_start
  rabbitmq_wait
  base_image_build
  # The systemd and Java flavours: build.sh rebuilds one only when its recipe (its files and
  # its base's id) changed, so an image older than the checkout's recipe never stays.
  "$REPO_ROOT/images/base-systemd/build.sh" build
  "$REPO_ROOT/images/base-systemd/build.sh" build java-tomcat
  "$REPO_ROOT/scripts/maven-repo.sh" up
  # DOCKVM_HOSTS > 1: the local datacenter (extra engines, OVS fabric); services.sh starts
  # their agents.
  "$REPO_ROOT/scripts/hosts.sh" up
  say "stack: up in $((SECONDS - t0))s (state: $STATE)"
}

cmd_down() {
  local dc
  mkdir -p "$RUN_DIR"
  # Whatever DOCKVM_HOSTS says now: every extra host and the fabric go (OVS must still run).
  "$REPO_ROOT/scripts/hosts.sh" down
  "$REPO_ROOT/scripts/maven-repo.sh" down
  ovs_down
  lxcfs_down
  prometheus_down
  for dc in dc2 dc1; do
    if pid_alive "$RUN_DIR/registry-$dc.pid"; then
      say "stack: stopping registry $dc"
      stop_pidfile "registry-$dc"
    fi
  done
  "$REPO_ROOT/scripts/registry.sh" down
  if pid_alive "$RUN_DIR/dockerd.pid"; then
    say "stack: stopping dockerd"
    # dockerd stops its containers first; give them their stop timeouts.
    stop_pidfile dockerd 90
  fi
  if pid_alive "$RUN_DIR/ferretdb.pid"; then
    say "stack: stopping ferretdb"
    stop_pidfile ferretdb
  fi
  rabbitmq_down
  say "stack: down (data kept in $STATE)"
}

# cmd_clean removes the state. Machines' XFS volumes may still be loop-mounted below it: they are
# unmounted and their loop devices detached first, and rm never crosses into another filesystem.
cmd_clean() {
  local m loop
  cmd_down
  "$REPO_ROOT/scripts/hosts.sh" clean
  [[ -d $STATE ]] || return 0
  awk -v d="$STATE/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || warn "clean: could not unmount $m"
  done
  losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r loop m; do
    if [[ $m == "$STATE/"* ]]; then losetup -d "$loop" || warn "clean: could not detach $loop"; fi
  done
  rm -rf --one-file-system "$STATE"
  say "stack: removed $STATE"
}

_row() { printf '%-13s %-46s %s\n' "$1" "$2" "$3"; }
_state() { if "$@"; then echo up; else echo down; fi; }

cmd_status() {
  local down=0 s
  _row COMPONENT ADDRESS STATE
  s=$(_state rabbitmq_up); _row rabbitmq "amqp://$(amqp_addr) $(mgmt_url)" "$s"; [[ $s == up ]] || down=1
  if [[ -n ${DOCKVM_MONGO_URL:-} ]]; then
    _row ferretdb "(DOCKVM_MONGO_URL is set)" skipped
  else
    s=$(_state ferretdb_up); _row ferretdb "mongodb://$DOCKVM_HOST:$DOCKVM_FERRETDB_PORT" "$s"; [[ $s == up ]] || down=1
  fi
  s=$(_state docker_up); _row docker "unix:///var/run/docker.sock" "$s"; [[ $s == up ]] || down=1
  if [[ $DOCKVM_REGISTRY_STORAGE == filesystem ]]; then
    for dc in dc1 dc2; do
      s=$(_state registry_up "$dc"); _row "registry-$dc" "http://$DOCKVM_HOST:$(registry_port "$dc")" "$s"; [[ $s == up ]] || down=1
    done
  else
    "$REPO_ROOT/scripts/registry.sh" status || down=1
  fi
  _row lxcfs "$DOCKVM_LXCFS_DIR" "$(_state lxcfs_up)"
  _row ovs "unix:$OVS_RUN/db.sock" "$(_state ovs_up)"
  s=$(_state prom_up); _row prometheus "$(prom_url)" "$s"; [[ $s == up ]] || down=1
  s=$(_state am_up); _row alertmanager "$(am_url)" "$s"; [[ $s == up ]] || down=1
  s=$(_state base_image_up); _row base-image "$DOCKVM_BASE_IMAGE" "$s"; [[ $s == up ]] || down=1
  s=$("$REPO_ROOT/scripts/maven-repo.sh" status); _row maven-repo "http://$DOCKVM_HOST:${DOCKVM_MAVEN_PORT:-8090}" "$s"
  [[ $s == up ]] || down=1
  ((DOCKVM_HOSTS <= 1)) || "$REPO_ROOT/scripts/hosts.sh" status || down=1
  return $((down ? 3 : 0))
}

# infra-up / infra-down: only RabbitMQ and FerretDB, for a second broker and database of their
# own (other DOCKVM_RABBITMQ_* / DOCKVM_FERRETDB_* / DOCKVM_STATE_DIR): the chaos suite
# restarts those without touching the stack everything else uses.
cmd_infra_up() {
  ensure_state_dirs
  rabbitmq_launch
  ferretdb_start
  rabbitmq_wait
}

cmd_infra_down() {
  mkdir -p "$RUN_DIR"
  if pid_alive "$RUN_DIR/ferretdb.pid"; then stop_pidfile ferretdb; fi
  rabbitmq_down
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  clean) cmd_clean ;;
  infra-up) cmd_infra_up ;;
  infra-down) cmd_infra_down ;;
  *) echo "usage: $0 up|down|status|clean|infra-up|infra-down" >&2; exit 2 ;;
esac
