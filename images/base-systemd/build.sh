#!/usr/bin/env bash
# The systemd flavour of the machine image, dockvm/base-systemd:bookworm: dockvm/base:bookworm
# plus systemd as PID 1 (install.sh and the units beside it), committed as one layer on top of
# the base, so the two share everything else. No public registry: the packages come from the
# Debian mirror the base's apt points at, through the host's network.
#
#   build.sh build [java-tomcat]   build if missing or if its base or recipe changed; push to dc1
#
# java-tomcat: the Java flavour, dockvm/java-tomcat:bookworm, made the same way on top of this
# one (images/java-tomcat: openjdk-17-jre-headless and tomcat10, a war release as Tomcat's ROOT).
# The recipe hash (the base image's id plus the flavour's files) is the dockvm.recipe label.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/../../scripts/lib.sh"

: "${DOCKVM_SYSTEMD_IMAGE:=dockvm/base-systemd:bookworm}"
: "${DOCKVM_JAVA_IMAGE:=dockvm/java-tomcat:bookworm}"
FLAVOUR=${2:-base-systemd}
case $FLAVOUR in
  base-systemd) IMAGE=$DOCKVM_SYSTEMD_IMAGE ;;
  java-tomcat) IMAGE=$DOCKVM_JAVA_IMAGE DOCKVM_BASE_IMAGE=$DOCKVM_SYSTEMD_IMAGE ;;
  *) die "base-systemd: unknown flavour $FLAVOUR (base-systemd or java-tomcat)" ;;
esac
HERE=$REPO_ROOT/images/$FLAVOUR
LOG=$LOG_DIR/$FLAVOUR.log
DC1=$DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT

recipe_hash() {
  { docker image inspect -f '{{.Id}}' "$DOCKVM_BASE_IMAGE"; (cd "$HERE" && sha256sum ./*); } |
    sha256sum | cut -d' ' -f1
}

run() { "$@" >>"$LOG" 2>&1 || die "base-systemd: '$*' failed (log: $LOG)"; }

cmd_build() {
  local hash old_id
  ensure_state_dirs
  docker image inspect "$DOCKVM_BASE_IMAGE" >/dev/null 2>&1 || die "base-systemd: no $DOCKVM_BASE_IMAGE"
  hash=$(recipe_hash)
  if [[ $(docker image inspect -f '{{ index .Config.Labels "dockvm.recipe" }}' "$IMAGE" 2>/dev/null) == "$hash" ]]; then
    say "base-systemd: $IMAGE is current (recipe ${hash:0:12})"
  else
    say "base-systemd: building $IMAGE (recipe ${hash:0:12}; log: $LOG)"
    old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    # Globals: the EXIT trap runs after this function's locals are gone.
    name=dockvm-base-systemd-build-$$
    ctx=$(mktemp -d)
    trap 'docker rm -f "$name" >/dev/null 2>&1; rm -rf "$ctx"' EXIT
    run docker create --name "$name" --network host --entrypoint /bin/sh "$DOCKVM_BASE_IMAGE" \
      /tmp/flavour/install.sh
    run docker cp "$HERE/." "$name:/tmp/flavour"
    run docker start -a "$name"
    # docker commit cannot set STOPSIGNAL: a one-line build on the committed layer does.
    run docker commit --change 'ENTRYPOINT ["/sbin/init"]' --change 'CMD []' \
      --change 'ENV container=docker' "$name" "$IMAGE-commit"
    cat >"$ctx/Dockerfile" <<EOT
FROM $IMAGE-commit
STOPSIGNAL SIGINT
LABEL dockvm.init=systemd dockvm.recipe=$hash
EOT
    DOCKER_BUILDKIT=0 run docker build -q -t "$IMAGE" "$ctx"
    run docker image rm "$IMAGE-commit"
    if [[ -n $old_id && $old_id != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]]; then
      docker image rm "$old_id" >>"$LOG" 2>&1 || true # still used by a machine: keep it
    fi
  fi
  push_dc1
}

# push_dc1: tags and pushes the image to dc1, unless dc1 already serves the same digest.
push_dc1() {
  local remote repo=${IMAGE%:*} tag=${IMAGE##*:}
  remote=$(curl -sfI -m 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$DC1/v2/$repo/manifests/$tag" | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true)
  if [[ -n $remote ]] && docker image inspect -f '{{range .RepoDigests}}{{println .}}{{end}}' "$IMAGE" |
    grep -qxF "$DC1/$repo@$remote"; then
    say "base-systemd: $DC1/$IMAGE is current"
    return
  fi
  say "base-systemd: pushing $DC1/$IMAGE"
  run docker tag "$IMAGE" "$DC1/$IMAGE"
  run docker push "$DC1/$IMAGE"
}

case ${1:-build} in
  build) cmd_build ;;
  *) echo "usage: $0 build" >&2; exit 2 ;;
esac
