#!/usr/bin/env bash
# The control plane under docker-compose (v1), from the dockvm image, against the local stack.
#
#   compose.sh up     write the secret files once, make the vhost, start the five, wait for
#                     each /readyz
#   compose.sh down   stop and remove the containers (state and secrets stay)
#   compose.sh replace SERVICE...
#                     recreate those services from $DOCKVM_IMAGE (an upgrade: SIGTERM, drain,
#                     start the new image), one after the other, each ready before the next
#   compose.sh ps     docker-compose ps
#
# Settings: $DOCKVM_COMPOSE_ENV (default compose/dockvm.env); a variable already in the
# environment wins over the file. Files: $DOCKVM_COMPOSE_STATE (the services' state dir,
# default $DOCKVM_STATE_DIR/compose/state) and $DOCKVM_COMPOSE_SECRETS (one file per secret
# setting, default $DOCKVM_STATE_DIR/compose/secrets), both 0700 and owned by the image's user.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/../scripts/lib.sh"

IMAGE_UID=10001
SERVICES=(gateway ipam imagesync bastion builder)
: "${DOCKVM_COMPOSE_ENV:=$REPO_ROOT/compose/dockvm.env}"

load_env() {
  local line name
  [[ -f $DOCKVM_COMPOSE_ENV ]] || die "compose: no env file $DOCKVM_COMPOSE_ENV"
  while IFS= read -r line; do
    [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || continue
    name=${BASH_REMATCH[1]}
    [[ -n ${!name+x} ]] || export "$name=${BASH_REMATCH[2]}"
  done <"$DOCKVM_COMPOSE_ENV"
  : "${COMPOSE_PROJECT_NAME:=dockvm}" "${DOCKVM_COMPOSE_VHOST:=/}"
  : "${DOCKVM_COMPOSE_STATE:=$STATE/compose/state}" "${DOCKVM_COMPOSE_SECRETS:=$STATE/compose/secrets}"
  if [[ -z ${DOCKVM_IMAGE:-} ]]; then
    DOCKVM_IMAGE=dockvm/dockvm:$(python3 -c 'import tomllib; print(tomllib.load(open("'"$REPO_ROOT"'/pyproject.toml", "rb"))["project"]["version"])')
  fi
  DOCKVM_DOCKER_GID=$(stat -c %g /var/run/docker.sock)
  export COMPOSE_PROJECT_NAME DOCKVM_COMPOSE_VHOST DOCKVM_COMPOSE_STATE DOCKVM_COMPOSE_SECRETS \
    DOCKVM_IMAGE DOCKVM_DOCKER_GID
}

dc() {
  command -v docker-compose >/dev/null || die "compose: docker-compose missing; run scripts/install.sh"
  docker-compose -p "$COMPOSE_PROJECT_NAME" -f "$REPO_ROOT/compose/docker-compose.yml" "$@"
}

# put_secret NAME VALUE: writes the secret file unless it exists (an operator's own wins).
put_secret() {
  local f=$DOCKVM_COMPOSE_SECRETS/$1
  [[ -s $f ]] && return 0
  (umask 077 && printf '%s' "$2" >"$f")
}

write_secrets() {
  local vhost
  (umask 077 && mkdir -p "$DOCKVM_COMPOSE_SECRETS" "$DOCKVM_COMPOSE_STATE")
  vhost=$(python3 -c 'import sys, urllib.parse as u; print(u.quote(sys.argv[1], safe=""))' "$DOCKVM_COMPOSE_VHOST")
  [[ $DOCKVM_COMPOSE_VHOST == / ]] && vhost=
  put_secret DOCKVM_AMQP_URL "amqp://guest:guest@$DOCKVM_HOST:$DOCKVM_RABBITMQ_PORT/$vhost"
  put_secret DOCKVM_MONGO_URL "${DOCKVM_MONGO_URL:-mongodb://$DOCKVM_HOST:$DOCKVM_FERRETDB_PORT/}"
  # The local registries sign their notifications with the stack's secret.
  if [[ -s $STATE/webhook.secret ]]; then
    put_secret DOCKVM_WEBHOOK_SECRET "$(<"$STATE/webhook.secret")"
  else
    put_secret DOCKVM_WEBHOOK_SECRET "$(openssl rand -hex 32)"
  fi
  # Only the `backing` profile's own RabbitMQ and MongoDB read these (with that profile, write
  # DOCKVM_AMQP_URL and DOCKVM_MONGO_URL with them yourself); compose wants every file to exist.
  put_secret RABBITMQ_PASSWORD "$(openssl rand -hex 24)"
  put_secret MONGO_PASSWORD "$(openssl rand -hex 24)"
  chown -R "$IMAGE_UID:$IMAGE_UID" "$DOCKVM_COMPOSE_SECRETS" "$DOCKVM_COMPOSE_STATE"
  chmod 0700 "$DOCKVM_COMPOSE_SECRETS" "$DOCKVM_COMPOSE_STATE"
  chmod 0400 "$DOCKVM_COMPOSE_SECRETS"/*
}

# The vhost keeps this control plane's queues apart from `make run`'s on the shared broker.
make_vhost() {
  local q api="http://$DOCKVM_HOST:$DOCKVM_RABBITMQ_MGMT_PORT/api"
  [[ $DOCKVM_COMPOSE_VHOST == / ]] && return 0
  q=$(python3 -c 'import sys, urllib.parse as u; print(u.quote(sys.argv[1], safe=""))' "$DOCKVM_COMPOSE_VHOST")
  curl -fsS -u guest:guest -X PUT "$api/vhosts/$q" >/dev/null ||
    die "compose: could not create vhost $DOCKVM_COMPOSE_VHOST"
  curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$api/permissions/$q/guest" >/dev/null ||
    die "compose: could not grant guest vhost $DOCKVM_COMPOSE_VHOST"
}

port_of() { local v="DOCKVM_${1^^}_PORT"; echo "${!v}"; }
ready() { [[ $(http_code "http://127.0.0.1:$(port_of "$1")/readyz") == 200 ]]; }

cmd_up() {
  local svc failed=0
  docker image inspect "$DOCKVM_IMAGE" >/dev/null 2>&1 || die "compose: no image $DOCKVM_IMAGE; run make image"
  write_secrets
  make_vhost
  dc up -d --no-build "${SERVICES[@]}"
  for svc in "${SERVICES[@]}"; do
    if ! wait_until "${DOCKVM_READY_TIMEOUT:-90}" ready "$svc"; then
      printf 'error: compose: %s not ready on port %s (docker-compose -p %s logs %s)\n' \
        "$svc" "$(port_of "$svc")" "$COMPOSE_PROJECT_NAME" "$svc" >&2
      failed=1
    fi
  done
  ((failed)) && exit 1
  say "compose: API http://127.0.0.1:$DOCKVM_GATEWAY_PORT/v1 (admin token: $DOCKVM_COMPOSE_STATE/admin.token)"
}

cmd_replace() {
  local svc
  (($#)) || die "compose: replace which services? (${SERVICES[*]})"
  docker image inspect "$DOCKVM_IMAGE" >/dev/null 2>&1 || die "compose: no image $DOCKVM_IMAGE; run make image"
  for svc in "$@"; do
    [[ " ${SERVICES[*]} " == *" $svc "* ]] || die "compose: unknown service '$svc' (${SERVICES[*]})"
    dc up -d --no-deps --no-build "$svc"
    wait_until "${DOCKVM_READY_TIMEOUT:-90}" ready "$svc" ||
      die "compose: $svc not ready on port $(port_of "$svc") after the replacement"
    say "compose: $svc runs $DOCKVM_IMAGE"
  done
}

load_env
case ${1:-} in
  up) cmd_up ;;
  replace) shift; cmd_replace "$@" ;;
  down) dc down --remove-orphans ;;
  ps) dc ps ;;
  *) echo "usage: $0 up|down|ps" >&2; exit 2 ;;
esac
