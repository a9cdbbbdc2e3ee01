#!/usr/bin/env bash
# Puts dockvm's host agents (provisioner, monitor) on this Docker host as systemd services.
#
#   host-install.sh [--image REF] [--host-id ID] [--root DIR] [--no-start]
#
# 1. the code: /opt/dockvm (venv and source) copied out of the dockvm image (REF, default
#    dockvm/dockvm:<version>, pulled from the dc1 registry when not here), so the agents run
#    the very bits the control plane's containers run; the venv's python is the host's
#    /usr/bin/python3 (Debian bookworm's 3.11, as in the image). Replaced atomically: a running
#    agent keeps its open files; `systemctl restart` picks up the new code.
# 2. the units: deploy/systemd/dockvm-{provisioner,monitor}.service into /etc/systemd/system.
# 3. the settings: deploy/systemd/dockvm.env into /etc/dockvm/dockvm.env (0600) unless one is
#    there (it holds credentials an operator has filled in: never overwritten).
# 4. systemctl daemon-reload, enable --now (only when systemd runs this machine, --root is /
#    and no --no-start).
# --root DIR installs under DIR instead of / (a staging tree; the tests use it).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("'"$REPO_ROOT"'/pyproject.toml", "rb"))["project"]["version"])')
IMAGE=dockvm/dockvm:$VERSION
HOST_ID=
ROOT=/
START=1
UNITS=(dockvm-provisioner.service dockvm-monitor.service)

while (($#)); do
  case $1 in
    --image) IMAGE=${2:?--image needs a reference}; shift 2 ;;
    --host-id) HOST_ID=${2:?--host-id needs an id}; shift 2 ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --no-start) START=0; shift ;;
    *) die "host-install: unknown argument '$1' (usage: $0 [--image REF] [--host-id ID] [--root DIR] [--no-start])" ;;
  esac
done
[[ -z $HOST_ID || $HOST_ID =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || die "host-install: bad --host-id '$HOST_ID'"
[[ -d $ROOT ]] || die "host-install: --root $ROOT is not a directory"
ROOT=$(cd "$ROOT" && pwd)
P=${ROOT%/}

install_code() {
  local cid new=$P/opt/dockvm.new old=$P/opt/dockvm.old
  if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "host-install: pulling $DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT/$IMAGE"
    docker pull -q "$DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT/$IMAGE" >/dev/null ||
      die "host-install: no image $IMAGE here nor in dc1 (make image)"
    docker tag "$DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT/$IMAGE" "$IMAGE"
  fi
  mkdir -p "$P/opt"
  rm -rf "$new" "$old"
  cid=$(docker create "$IMAGE")
  # shellcheck disable=SC2064 # expand now
  trap "docker rm -f '$cid' >/dev/null 2>&1 || true" RETURN
  docker cp "$cid:/opt/dockvm" "$new"
  chown -R root:root "$new"
  chmod -R go-w "$new"
  [[ -e $P/opt/dockvm ]] && mv "$P/opt/dockvm" "$old"
  mv "$new" "$P/opt/dockvm"
  rm -rf "$old"
  say "host-install: $IMAGE -> $P/opt/dockvm"
}

install_config() {
  local env=$P/etc/dockvm/dockvm.env u
  install -d -m 0755 "$P/etc/systemd/system"
  for u in "${UNITS[@]}"; do
    install -m 0644 "$REPO_ROOT/deploy/systemd/$u" "$P/etc/systemd/system/$u"
  done
  install -d -m 0700 "$P/etc/dockvm"
  if [[ -e $env ]]; then
    say "host-install: keeping $env"
  else
    (umask 077 && sed -e "s/^DOCKVM_HOST_ID=.*/DOCKVM_HOST_ID=${HOST_ID:-$(hostname -s | tr 'A-Z_' 'a-z-')}/" \
      "$REPO_ROOT/deploy/systemd/dockvm.env" >"$env")
    say "host-install: wrote $env (mode 0600): set the bus and database URLs there"
  fi
  [[ -z $HOST_ID ]] || sed -i "s/^DOCKVM_HOST_ID=.*/DOCKVM_HOST_ID=$HOST_ID/" "$env"
}

start_units() {
  if ((!START)) || [[ $ROOT != / ]] || [[ $(ps -p 1 -o comm= 2>/dev/null) != systemd ]]; then
    say "host-install: not started; on the host: systemctl daemon-reload && systemctl enable --now ${UNITS[*]}"
    return
  fi
  systemctl daemon-reload
  systemctl enable "${UNITS[@]}"
  # restart, not start: an upgrade replaces the code under running agents.
  systemctl restart "${UNITS[@]}"
  say "host-install: ${UNITS[*]} running"
}

install_code
install_config
start_units
