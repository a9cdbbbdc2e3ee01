#!/usr/bin/env bash
# The dockvm image, dockvm/dockvm:<version of pyproject.toml>, built from the local base image
# (deploy/image/Dockerfile; nothing is pulled from a public registry), then pushed to dc1.
#
#   image.sh build   build (layers cached) and tag; prints the image reference
#   image.sh push    build, then push to the dc1 registry as <dc1>/dockvm/dockvm:<version>
#
# The context is a tarball of only what the image needs, plus constraints.txt: the venv's
# pinned versions (pip freeze), so that the image runs what the tests ran, and ca-bundle.crt:
# the host's CA bundle (DOCKVM_BUILD_CA_BUNDLE), which the builder stage's downloads trust.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("'"$REPO_ROOT"'/pyproject.toml", "rb"))["project"]["version"])')
: "${DOCKVM_IMAGE:=dockvm/dockvm:$VERSION}"
DC1=$DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT

cmd_build() {
  local ctx
  docker image inspect "$DOCKVM_BASE_IMAGE" >/dev/null 2>&1 ||
    die "image: no local $DOCKVM_BASE_IMAGE; run scripts/base-image.sh build (or make stack)"
  ctx=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: ctx is local
  trap "rm -rf '$ctx'" RETURN
  if [[ -x $REPO_ROOT/.venv/bin/pip ]]; then
    "$REPO_ROOT/.venv/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v '^dockvm' >"$ctx/constraints.txt" || true
  else
    : >"$ctx/constraints.txt"
  fi
  tar -C "$REPO_ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf "$ctx/context.tar" \
    pyproject.toml libs services cli deploy/image
  cp "${DOCKVM_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/ca-bundle.crt"
  tar -C "$ctx" -rf "$ctx/context.tar" constraints.txt ca-bundle.crt
  mkdir -p "$LOG_DIR"
  say "image: building $DOCKVM_IMAGE from $DOCKVM_BASE_IMAGE (log: $LOG_DIR/image.log)"
  # --network host: the builder stage reaches the Debian mirror and PyPI through the host.
  docker build --network host --build-arg "BASE=$DOCKVM_BASE_IMAGE" --build-arg "VERSION=$VERSION" \
    -f deploy/image/Dockerfile -t "$DOCKVM_IMAGE" - <"$ctx/context.tar" >>"$LOG_DIR/image.log" 2>&1 ||
    die "image: docker build failed (log: $LOG_DIR/image.log)"
  say "$DOCKVM_IMAGE"
}

cmd_push() {
  cmd_build
  docker tag "$DOCKVM_IMAGE" "$DC1/$DOCKVM_IMAGE"
  docker push "$DC1/$DOCKVM_IMAGE" >>"$LOG_DIR/image.log" 2>&1 ||
    die "image: push to $DC1 failed (log: $LOG_DIR/image.log)"
  say "image: pushed $DC1/$DOCKVM_IMAGE"
}

case ${1:-} in
  build) cmd_build ;;
  push) cmd_push ;;
  *) echo "usage: $0 build|push" >&2; exit 2 ;;
esac
