#!/usr/bin/env bash
# The local datacenter: with DOCKVM_HOSTS=N > 1, N Docker hosts h1..hN on this machine besides
# the main engine (which stays as it is, host local1, for the tests that want it), joined by an
# Open vSwitch layer-2 fabric built like the production network. N = 1 starts nothing.
#
#   hosts.sh up           start the extra engines and the fabric (idempotent); with
#                         DOCKVM_HOSTS_AGENTS=1 each host's agents too
#   hosts.sh agents start|stop   each host's provisioner and monitor (services.sh runs this)
#   hosts.sh down         stop them and remove the fabric (engines' data stays)
#   hosts.sh clean        down, then remove their data under $DOCKVM_STATE_DIR/hosts
#   hosts.sh status       host / socket / engine / agents
#   hosts.sh vlan add VLAN GATEWAY/PREFIX   carry VLAN on every trunk, gateway port on the ToR
#   hosts.sh vlan del VLAN
#   hosts.sh engine hN stop|start           that host's dockerd alone
#
# Per extra host hN: dockerd on /run/dockvm/hosts/hN/docker.sock (exec-root beside it: the
# containerd socket path must stay short), data-root $STATE/hosts/hN/docker, no Docker bridge
# and no iptables rules (so it never fights the main engine); OVS bridge dvh-hN whose two uplinks
# (veths dvhNu0, dvhNu1) form the active-backup bond dvhNbond, a trunk of the VLANs in use, to
# the "top-of-rack" bridge dvh-tor (ports dvhNt0, dvhNt1, allowing every VLAN). The trunk carries
# DOCKVM_FABRIC_VLANS and each VLAN the host's agent adds for its machines (the provisioner's
# DOCKVM_OVS_UPLINK, DOCKVM_OVS_ROUTER). Each VLAN in use has an internal port
# dvhgwVLAN on the ToR holding the pool's gateway address: the root namespace reaches machine IPs
# through it, as through the datacenter's router. Machines attach with the provisioner's ovs
# driver (a veth as an access port tagged with the VLAN) on their host's bridge.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

: "${DOCKVM_HOSTS_RUN:=/run/dockvm/hosts}"
# The VLANs the fabric carries from the start, as VLAN:GATEWAY/PREFIX.
: "${DOCKVM_FABRIC_VLANS:=3160:10.231.60.1/24 3161:10.231.61.1/24 3162:10.231.62.1/24}"
# Host hN's agents listen on 9100 + 10*N + 3 (provisioner) and + 4 (monitor).
: "${DOCKVM_HOSTS_PORT_BASE:=9100}"
# 1: `up` starts each host's agents as well. scripts/stack.sh brings up engines and fabric
# only; scripts/services.sh starts the agents with the other services (`agents start`).
: "${DOCKVM_HOSTS_AGENTS:=0}"
HOSTS_STATE=$STATE/hosts
TOR=dvh-tor
PY=$REPO_ROOT/.venv/bin/python
VSCTL=(ovs-vsctl --timeout=10)

host_ids() { local n; ((DOCKVM_HOSTS > 1)) || return 0; for ((n = 1; n <= DOCKVM_HOSTS; n++)); do echo "h$n"; done; }
# Every host that has state or a pid file, whatever DOCKVM_HOSTS says now (down removes them all).
known_hosts() {
  { host_ids; ls "$HOSTS_STATE" 2>/dev/null | grep -E '^h[0-9]+$' || true
    ls "$RUN_DIR" 2>/dev/null | sed -n 's/^\(h[0-9]*\)-dockerd\.pid$/\1/p'; } | sort -uV
}
sock() { echo "$DOCKVM_HOSTS_RUN/$1/docker.sock"; }
engine_up() { timeout 10 docker -H "unix://$(sock "$1")" info >/dev/null 2>&1; }
port_of() { echo $((DOCKVM_HOSTS_PORT_BASE + 10 * ${1#h} + $2)); }

# --- engines --------------------------------------------------------------------------------

engine_start() {
  local h=$1 run=$DOCKVM_HOSTS_RUN/$1
  engine_up "$h" && return 0
  (umask 077 && mkdir -p "$HOSTS_STATE/$h/docker")
  mkdir -p "$run/exec"
  rm -f "$run/docker.pid"
  say "hosts: starting dockerd $h"
  # Its own managed containerd (under exec-root), cgroup parent and no networking of its own:
  # machines get theirs from OVS, and the main engine keeps docker0 and the iptables chains.
  spawn "$h-dockerd" dockerd --host "unix://$(sock "$h")" --data-root "$HOSTS_STATE/$h/docker" \
    --exec-root "$run/exec" --pidfile "$run/docker.pid" --storage-driver overlay2 \
    --bridge=none --iptables=false --ip-masq=false --ip-forward=false --userland-proxy=false \
    --cgroup-parent "dockvm-$h"
}

engine_wait() {
  local h=$1
  wait_until 60 engine_up "$h" ||
    die "hosts: dockerd $h not answering on $(sock "$h") after 60s (log: $LOG_DIR/$h-dockerd.log)"
}

# The base image, copied from the main engine once (a load is a local copy; no registry needed).
engine_image() {
  local h=$1
  docker -H "unix://$(sock "$h")" image inspect "$DOCKVM_BASE_IMAGE" >/dev/null 2>&1 && return 0
  docker image inspect "$DOCKVM_BASE_IMAGE" >/dev/null 2>&1 || return 0
  say "hosts: loading $DOCKVM_BASE_IMAGE into $h"
  docker save "$DOCKVM_BASE_IMAGE" | docker -H "unix://$(sock "$h")" load -q >/dev/null ||
    die "hosts: could not load $DOCKVM_BASE_IMAGE into $h"
}

# --- fabric ---------------------------------------------------------------------------------

ovs_ok() { timeout 5 "${VSCTL[@]}" show >/dev/null 2>&1; }
vlans_file() { echo "$HOSTS_STATE/vlans"; }
vlan_ids() { [[ -s $(vlans_file) ]] && awk '{ print $1 }' "$(vlans_file)" | sort -n | paste -sd, -; }

# veth_pair A B: a veth whose two ends OVS opens (userspace datapath: AF_PACKET on each end).
# No IPv6 on the fabric's links: their router solicitations would be the only other traffic.
veth_pair() {
  ip link show "$1" >/dev/null 2>&1 || ip link add "$1" type veth peer name "$2"
  sysctl -qw "net.ipv6.conf.$1.disable_ipv6=1" "net.ipv6.conf.$2.disable_ipv6=1" 2>/dev/null || true
  ip link set "$1" up
  ip link set "$2" up
}

netdev_br() {
  "${VSCTL[@]}" --may-exist add-br "$1" -- set bridge "$1" datapath_type=netdev
  ip link set "$1" up 2>/dev/null || true
}

fabric_host() {
  local h=$1 n=${1#h} trunks=$2 i
  netdev_br "dvh-$h"
  for i in 0 1; do
    veth_pair "dvh${n}u$i" "dvh${n}t$i"
    # The switch side allows every VLAN, as a datacenter's ToR port does; the host picks.
    "${VSCTL[@]}" --may-exist add-port "$TOR" "dvh${n}t$i" -- set port "dvh${n}t$i" vlan_mode=trunk
  done
  if ! "${VSCTL[@]}" list port "dvh${n}bond" >/dev/null 2>&1; then
    "${VSCTL[@]}" add-bond "dvh-$h" "dvh${n}bond" "dvh${n}u0" "dvh${n}u1" bond_mode=active-backup
  fi
  # Carrier detection: a link that goes down fails over at once (miimon is for the kernel bond).
  # "add": the VLANs the agent added for its machines (DOCKVM_OVS_UPLINK) stay on the trunk.
  # shellcheck disable=SC2086 # one word per VLAN
  "${VSCTL[@]}" set port "dvh${n}bond" vlan_mode=trunk \
    other_config:bond-detect-mode=carrier other_config:bond_updelay=0 \
    -- add port "dvh${n}bond" trunks ${trunks//,/ }
}

gateway_port() {
  local vlan=$1 cidr=$2 dev=dvhgw$1
  "${VSCTL[@]}" --may-exist add-port "$TOR" "$dev" tag="$vlan" -- set interface "$dev" type=internal
  wait_until 10 ip link show "$dev" >/dev/null 2>&1 || die "hosts: gateway port $dev did not appear"
  ip addr replace "$cidr" dev "$dev"
  ip link set "$dev" up
}

fabric_up() {
  local trunks h vlan cidr
  ovs_ok || die "hosts: Open vSwitch is not running (scripts/stack.sh up starts it)"
  (umask 077 && mkdir -p "$HOSTS_STATE")
  if [[ ! -e $(vlans_file) ]]; then
    for vlan in $DOCKVM_FABRIC_VLANS; do echo "${vlan%%:*} ${vlan#*:}"; done >"$(vlans_file)"
  fi
  trunks=$(vlan_ids)
  # An empty trunks list would carry every VLAN; the fabric carries the ones in use only.
  [[ -n $trunks ]] || die "hosts: no VLAN in use (DOCKVM_FABRIC_VLANS is empty)"
  netdev_br "$TOR"
  for h in $(host_ids); do fabric_host "$h" "$trunks"; done
  while read -r vlan cidr; do gateway_port "$vlan" "$cidr"; done <"$(vlans_file)"
}

fabric_down() {
  local br dev
  if ovs_ok; then
    for br in $("${VSCTL[@]}" list-br | grep -E '^dvh-' || true); do
      "${VSCTL[@]}" --if-exists del-br "$br"
    done
  fi
  # The uplinks' veths outlive OVS (stopped or not); the other end of each goes with it.
  for dev in $(ip -o link show | awk -F': ' '{ print $2 }' | sed 's/@.*//' | grep -E '^dvh[0-9]+[ut][01]$' || true); do
    ip link del "$dev" 2>/dev/null || true
  done
}

# --- agents ---------------------------------------------------------------------------------

agents_start() {
  local h=$1 svc port
  ((DOCKVM_HOSTS_AGENTS)) || return 0
  [[ -x $PY ]] || { warn "hosts: no venv; $h's agents not started"; return 0; }
  for svc in provisioner monitor; do
    pid_alive "$RUN_DIR/$h-$svc.pid" && continue
    [[ $svc == provisioner ]] && port=$(port_of "$h" 3) || port=$(port_of "$h" 4)
    say "hosts: starting $h $svc on port $port"
    # The heartbeat's labels tell the gateway's Prometheus discovery where this host's agents are.
    (cd "$REPO_ROOT" && DOCKVM_DOCKER_URL="unix://$(sock "$h")" DOCKVM_NETWORK_DRIVER=ovs \
      DOCKVM_LABELS="{\"dockvm.metrics.provisioner\": \"127.0.0.1:$(port_of "$h" 3)\", \"dockvm.metrics.monitor\": \"127.0.0.1:$(port_of "$h" 4)\"}" \
      DOCKVM_OVS_BRIDGE="dvh-$h" DOCKVM_OVS_UPLINK="dvh${h#h}bond" DOCKVM_OVS_ROUTER="$TOR" spawn "$h-$svc" "$PY" -m "services.$svc" --port "$port" --host-id "$h")
  done
}

agents_stop() {
  local h=$1 svc
  for svc in provisioner monitor; do
    pid_alive "$RUN_DIR/$h-$svc.pid" && say "hosts: stopping $h $svc"
    stop_pidfile "$h-$svc" 30
  done
}

# --- commands -------------------------------------------------------------------------------

cmd_up() {
  local t0=$SECONDS h
  ensure_state_dirs
  # DOCKVM_HOSTS=1 leaves running hosts alone (a test may have brought up its own; `down`
  # removes them). Hosts beyond a smaller N > 1 are stopped, their data kept.
  ((DOCKVM_HOSTS > 1)) || return 0
  for h in $(known_hosts); do
    ((${h#h} <= DOCKVM_HOSTS)) || { agents_stop "$h"; stop_pidfile "$h-dockerd" 90; }
  done
  for h in $(host_ids); do engine_start "$h"; done
  fabric_up
  for h in $(host_ids); do engine_wait "$h"; engine_image "$h"; agents_start "$h"; done
  say "hosts: $DOCKVM_HOSTS hosts up in $((SECONDS - t0))s (VLANs $(vlan_ids))"
}

# term_all NAME...: SIGTERM each live $RUN_DIR/NAME.pid at once, so that they stop in parallel.
term_all() {
  local name pid
  for name; do
    pid_alive "$RUN_DIR/$name.pid" || continue
    say "hosts: stopping $name"
    read -r pid _ <"$RUN_DIR/$name.pid"
    kill -TERM "$pid" 2>/dev/null || true
  done
}

# cmd_agents start|stop: the provisioner and monitor of every host (start waits for /readyz).
cmd_agents() {
  local h p failed=0
  case ${1:-} in
    start)
      ((DOCKVM_HOSTS > 1)) || return 0
      for h in $(host_ids); do
        engine_up "$h" || die "hosts: $h's engine is not up (scripts/stack.sh up starts it)"
        DOCKVM_HOSTS_AGENTS=1 agents_start "$h"
      done
      for h in $(host_ids); do
        for p in 3 4; do
          wait_until "${DOCKVM_READY_TIMEOUT:-60}" agent_ready "$h" "$p" || {
            printf 'error: %s: agent on port %s not ready (logs: %s/%s-*.log)\n' \
              "$h" "$(port_of "$h" "$p")" "$LOG_DIR" "$h" >&2
            failed=1
          }
        done
      done
      return $failed ;;
    stop)
      for h in $(known_hosts); do agents_stop "$h"; done ;;
    *) die "usage: $0 agents start|stop" ;;
  esac
}

# agent_ready hN 3|4: that host's provisioner (3) or monitor (4) answers /readyz.
agent_ready() { [[ $(http_code "http://127.0.0.1:$(port_of "$1" "$2")/readyz") == 200 ]]; }

cmd_down() {
  local h names=()
  mkdir -p "$RUN_DIR"
  for h in $(known_hosts); do names+=("$h-provisioner" "$h-monitor"); done
  term_all "${names[@]}"
  for h in "${names[@]}"; do stop_pidfile "$h" 30; done
  names=()
  for h in $(known_hosts); do names+=("$h-dockerd"); done
  term_all "${names[@]}"
  # dockerd stops its containers first; give them their stop timeouts.
  for h in "${names[@]}"; do stop_pidfile "$h" 90; done
  fabric_down
  rm -f "$HOSTS_STATE/vlans"
}

cmd_clean() {
  local m
  cmd_down
  [[ -d $HOSTS_STATE ]] || return 0
  awk -v d="$HOSTS_STATE/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || warn "hosts: could not unmount $m"
  done
  rm -rf --one-file-system "$HOSTS_STATE" "$DOCKVM_HOSTS_RUN"
}

cmd_status() {
  local h s a down=0
  printf '%-5s %-40s %-7s %s\n' HOST SOCKET ENGINE AGENTS
  for h in $(host_ids); do
    if engine_up "$h"; then s=up; else s=down; down=1; fi
    a=$(pid_alive "$RUN_DIR/$h-provisioner.pid" && pid_alive "$RUN_DIR/$h-monitor.pid" && echo up || echo down)
    printf '%-5s %-40s %-7s %s\n' "$h" "$(sock "$h")" "$s" "$a"
  done
  return $((down ? 3 : 0))
}

cmd_vlan() {
  local op=${1:-} vlan=${2:-} cidr=${3:-} h trunks
  [[ $vlan =~ ^[0-9]+$ ]] && ((vlan >= 1 && vlan <= 4094)) || die "hosts: VLAN must be 1..4094, not '$vlan'"
  (umask 077 && mkdir -p "$HOSTS_STATE" && touch "$(vlans_file)")
  if [[ $op == del && $(grep -cv "^$vlan " "$(vlans_file)") == 0 ]]; then
    die "hosts: VLAN $vlan is the last one in use; an empty trunk would carry all"
  fi
  sed -i "/^$vlan /d" "$(vlans_file)"
  case $op in
    add)
      [[ $cidr =~ ^[0-9.]+/[0-9]+$ ]] || die "hosts: gateway must be ADDRESS/PREFIX, not '$cidr'"
      echo "$vlan $cidr" >>"$(vlans_file)" ;;
    del) "${VSCTL[@]}" --if-exists del-port "$TOR" "dvhgw$vlan" ;;
    *) die "usage: $0 vlan add VLAN GATEWAY/PREFIX | vlan del VLAN" ;;
  esac
  # The hosts on the fabric now, whatever DOCKVM_HOSTS this shell has.
  for h in $("${VSCTL[@]}" list-br | sed -n 's/^dvh-\(h[0-9]*\)$/\1/p'); do
    if [[ $op == add ]]; then
      "${VSCTL[@]}" add port "dvh${h#h}bond" trunks "$vlan"
    else
      "${VSCTL[@]}" remove port "dvh${h#h}bond" trunks "$vlan"
    fi
  done
  [[ $op == del ]] || gateway_port "$vlan" "$cidr"
}

# cmd_engine hN stop|start: that host's engine alone (its containers stop with it; a test of a
# host's restart). start also reloads the base image if the engine's store lost it.
cmd_engine() {
  local h=${1:-}
  [[ $h =~ ^h[0-9]+$ && -d $HOSTS_STATE/$h ]] || die "hosts: no host '$h' (hosts.sh status lists them)"
  case ${2:-} in
    stop) say "hosts: stopping dockerd $h"; stop_pidfile "$h-dockerd" 90 ;;
    start) engine_start "$h"; engine_wait "$h"; engine_image "$h" ;;
    *) die "usage: $0 engine hN stop|start" ;;
  esac
}

case ${1:-} in
  up) cmd_up ;;
  agents) shift; cmd_agents "$@" ;;
  engine) shift; cmd_engine "$@" ;;
  down) cmd_down ;;
  clean) cmd_clean ;;
  status) cmd_status ;;
  vlan) shift; cmd_vlan "$@" ;;
  *) echo "usage: $0 up|down|clean|status|agents start|stop|vlan add|del ...|engine hN stop|start" >&2; exit 2 ;;
esac
