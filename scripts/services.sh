#!/usr/bin/env bash
# The seven dockvm services as background processes from the venv, on loopback.
#
#   services.sh start   start those not running, then wait for each /readyz
#   services.sh stop    SIGTERM, then wait for them to drain
#   services.sh status  service / health URL / up|down
#
# With DOCKVM_HOSTS > 1 (the default, 3) the host agents (provisioner, monitor) run on the local
# datacenter's hosts h1..hN (scripts/hosts.sh agents), not on the main engine: a machine there
# would sit on a Docker bridge apart from the fabric's VLANs. DOCKVM_HOSTS=1 runs them on the
# main engine as host local1.
#
# Pid files: $DOCKVM_STATE_DIR/run/<service>.pid; logs: $DOCKVM_STATE_DIR/log/<service>.log.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

: "${DOCKVM_HOST_ID:=local1}"
: "${DOCKVM_READY_TIMEOUT:=60}"
# Machines' images must come from the platform's builder (or be a base the image policy lists).
: "${DOCKVM_REQUIRE_BUILT_IMAGES:=true}"
export DOCKVM_REQUIRE_BUILT_IMAGES
PY=$REPO_ROOT/.venv/bin/python

SERVICES=(gateway imagesync ipam provisioner monitor bastion builder)
declare -A PORT=([gateway]=8080 [imagesync]=8081 [ipam]=9102 [provisioner]=9103 [monitor]=9104 [bastion]=9105 [builder]=9106)
declare -A ARGS=([provisioner]="--host-id $DOCKVM_HOST_ID" [monitor]="--host-id $DOCKVM_HOST_ID")
ALL_SERVICES=("${SERVICES[@]}")
if ((DOCKVM_HOSTS > 1)); then
  SERVICES=(gateway imagesync ipam bastion builder)
fi

port_of() { local v="DOCKVM_${1^^}_PORT"; echo "${!v:-${PORT[$1]}}"; }
url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }
ready() { [[ $(http_code "$(url_of "$1")/readyz") == 200 ]]; }

# ready_or_dead NAME: true once NAME is ready or its process has exited (stops the wait early).
ready_or_dead() { ready "$1" || ! pid_alive "$RUN_DIR/$1.pid"; }

cmd_start() {
  local svc token_existed=0 failed=0 args
  ensure_state_dirs
  [[ -x $PY ]] || die "services: no venv at $REPO_ROOT/.venv; run scripts/install.sh"
  [[ -e $STATE/admin.token ]] && token_existed=1
  # The registries sign their webhook calls with this secret (scripts/stack.sh writes it).
  if [[ -z ${DOCKVM_WEBHOOK_SECRET:-} && -s $STATE/webhook.secret ]]; then
    DOCKVM_WEBHOOK_SECRET=$(<"$STATE/webhook.secret")
    export DOCKVM_WEBHOOK_SECRET
  fi
  for svc in "${SERVICES[@]}"; do
    if pid_alive "$RUN_DIR/$svc.pid" || ready "$svc"; then
      continue
    fi
    say "services: starting $svc"
    read -ra args <<<"${ARGS[$svc]:-}"
    (cd "$REPO_ROOT" && spawn "$svc" "$PY" -m "services.$svc" --port "$(port_of "$svc")" "${args[@]}")
  done
  for svc in "${SERVICES[@]}"; do
    wait_until "$DOCKVM_READY_TIMEOUT" ready_or_dead "$svc" || true
    if ! ready "$svc"; then
      printf 'error: %s: not ready at %s/readyz (log: %s)\n' "$svc" "$(url_of "$svc")" "$LOG_DIR/$svc.log" >&2
      failed=1
    fi
  done
  "$REPO_ROOT/scripts/hosts.sh" agents start || failed=1
  ((failed)) && exit 1
  say "services: API      $(url_of gateway)/v1"
  say "services: console  $(url_of gateway)/ui/  (log in with an API token, e.g. $STATE/admin.token)"
  say "services: SSH      ssh -p ${DOCKVM_BASTION_SSH_PORT:-2222} USER@127.0.0.1 root@MACHINE-IP (after dockvm user add / grant add)"
  for svc in "${SERVICES[@]}"; do
    printf 'services: %-12s %s/healthz  /readyz  /metrics\n' "$svc" "$(url_of "$svc")"
  done
  if [[ -s $STATE/admin.token ]]; then
    # A token file from an older gateway may be 0644. Its path is shown, never its content:
    # this output ends up in terminals' scrollback and CI logs.
    chmod 0600 "$STATE/admin.token"
    ((token_existed)) || say "services: admin token written to $STATE/admin.token (mode 0600)"
  fi
}

cmd_stop() {
  local svc pids=() pid
  mkdir -p "$RUN_DIR"
  # SIGTERM to all first, so they drain in parallel.
  # Every one that runs, whatever DOCKVM_HOSTS says now (local1's agents included).
  "$REPO_ROOT/scripts/hosts.sh" agents stop
  for svc in "${ALL_SERVICES[@]}"; do
    if pid_alive "$RUN_DIR/$svc.pid"; then
      say "services: stopping $svc"
      read -r pid _ <"$RUN_DIR/$svc.pid"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$svc")
    fi
  done
  for svc in "${pids[@]}"; do
    stop_pidfile "$svc" 30
  done
}

cmd_status() {
  local svc down=0 s
  printf '%-12s %-40s %s\n' SERVICE HEALTH STATE
  for svc in "${SERVICES[@]}"; do
    if ready "$svc"; then s=up; else s=down; down=1; fi
    printf '%-12s %-40s %s\n' "$svc" "$(url_of "$svc")/readyz" "$s"
  done
  return $((down ? 3 : 0))
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
