#!/usr/bin/env bash
# The base image of every dockvm machine, dockvm/base:bookworm, built without any public
# registry: debootstrap (minbase plus sshd and friends) -> the recipe in images/base/ ->
# `docker import`, then pushed to the dc1 registry.
#
#   base-image.sh build    build if the recipe changed, push to dc1 if dc1 lacks that digest
#   base-image.sh verify   start a machine from it on a bridge network and log in with a key
#
# The recipe hash (this script plus images/base/*) is the image's dockvm.recipe label: a build
# whose recipe has not changed is skipped. debootstrap's download is kept as a tarball under
# $DOCKVM_STATE_DIR/cache, so a rebuild does not fetch the packages again.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

SUITE=bookworm
PACKAGES=openssh-server,iproute2,procps,ca-certificates,python3,curl,iputils-ping,tini,prometheus-node-exporter
ENTRYPOINT='["/usr/bin/tini","--","/usr/local/sbin/dockvm-init"]'
# What sshd and the init need once every other capability is dropped; the provisioner grants
# the same set, and `verify` proves it is enough.
SSH_CAPS=(CHOWN DAC_OVERRIDE FOWNER SETUID SETGID SYS_CHROOT KILL AUDIT_WRITE NET_BIND_SERVICE)
LOG=$LOG_DIR/base-image.log
DC1=$DOCKVM_HOST:$DOCKVM_REGISTRY_DC1_PORT
REPO=${DOCKVM_BASE_IMAGE%:*}
TAG=${DOCKVM_BASE_IMAGE##*:}

recipe_hash() {
  (cd "$REPO_ROOT" && sha256sum scripts/base-image.sh images/base/*) | sha256sum | cut -d' ' -f1
}

# debian_mirror: the Debian mirror this machine's apt uses (deb822 or one-line sources).
debian_mirror() {
  local m
  if [[ -n ${DOCKVM_DEBIAN_MIRROR:-} ]]; then
    echo "$DOCKVM_DEBIAN_MIRROR"
    return
  fi
  m=$({
    sed -n 's/^[[:space:]]*URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
    sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
  } | grep -E '^https?://[^ ]+/debian/?$' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# run CMD...: runs CMD with its output in the log; on failure, one line and exit.
run() {
  "$@" >>"$LOG" 2>&1 || die "base-image: '$*' failed (log: $LOG)"
}

image_recipe() {
  docker image inspect -f '{{ index .Config.Labels "dockvm.recipe" }}' "$DOCKVM_BASE_IMAGE" 2>/dev/null || true
}

# umount_under DIR: unmounts whatever debootstrap left mounted below DIR, deepest first.
umount_under() {
  local m
  awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

BUILD_DIR=
cleanup() {
  if [[ -n $BUILD_DIR && -d $BUILD_DIR ]]; then
    umount_under "$BUILD_DIR"
    rm -rf --one-file-system "$BUILD_DIR"
  fi
}

build_rootfs() {
  local rootfs=$1 mirror tarball key
  mirror=$(debian_mirror)
  key=$(printf '%s %s %s %s' "$SUITE" "$PACKAGES" "$mirror" "$(dpkg --print-architecture)" | sha256sum | cut -c1-16)
  tarball=$STATE/cache/debootstrap-$SUITE-$key.tgz
  if [[ ! -s $tarball ]]; then
    say "base-image: downloading $SUITE packages from $mirror"
    run debootstrap --variant=minbase --include="$PACKAGES" --make-tarball="$tarball.part" \
      "$SUITE" "$BUILD_DIR/download" "$mirror"
    mv "$tarball.part" "$tarball"
  fi
  say "base-image: debootstrap $SUITE (minbase + ${PACKAGES//,/ })"
  run debootstrap --variant=minbase --include="$PACKAGES" --unpack-tarball="$tarball" \
    "$SUITE" "$rootfs" "$mirror"
  umount_under "$rootfs"

  install -m 0755 "$REPO_ROOT/images/base/dockvm-init" "$rootfs/usr/local/sbin/dockvm-init"
  install -m 0755 "$REPO_ROOT/images/base/dockvm-app" "$rootfs/usr/local/sbin/dockvm-app"
  mkdir -p "$rootfs/app/releases"
  install -m 0644 "$REPO_ROOT/images/base/sshd_config" "$rootfs/etc/ssh/sshd_config.d/dockvm.conf"
  # Each machine makes its own host keys on first start (dockvm-init).
  rm -f "$rootfs"/etc/ssh/ssh_host_*
  # pam_loginuid needs CAP_AUDIT_CONTROL, which machines don't get; required, it ends logins.
  sed -i 's/^session\s\+required\s\+pam_loginuid.so/session optional pam_loginuid.so/' "$rootfs/etc/pam.d/sshd"
  # Docker provides these per container; an image copy would be stale or shared.
  rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/machine-id"
  (cd "$rootfs" && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* var/log/*.log \
    var/cache/debconf/*-old dev/* proc/* sys/* run/*)
}

cmd_build() {
  local hash old_id
  ensure_state_dirs
  hash=$(recipe_hash)
  if [[ $(image_recipe) == "$hash" ]]; then
    say "base-image: $DOCKVM_BASE_IMAGE is current (recipe ${hash:0:12})"
  else
    say "base-image: building $DOCKVM_BASE_IMAGE (recipe ${hash:0:12}; log: $LOG)"
    old_id=$(docker image inspect -f '{{.Id}}' "$DOCKVM_BASE_IMAGE" 2>/dev/null || true)
    BUILD_DIR=$(mktemp -d "$STATE/cache/build.XXXXXX")
    trap cleanup EXIT
    build_rootfs "$BUILD_DIR/rootfs"
    say "base-image: docker import"
    tar --numeric-owner -C "$BUILD_DIR/rootfs" -c . 2>>"$LOG" |
      docker import \
        --change "ENTRYPOINT $ENTRYPOINT" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'EXPOSE 22' \
        --change "LABEL dockvm.recipe=$hash" \
        - "$DOCKVM_BASE_IMAGE" >>"$LOG" 2>&1 || die "base-image: docker import failed (log: $LOG)"
    cleanup
    trap - EXIT
    run docker run --rm --network none "$DOCKVM_BASE_IMAGE" /usr/sbin/sshd -t
    if [[ -n $old_id && $old_id != "$(docker image inspect -f '{{.Id}}' "$DOCKVM_BASE_IMAGE")" ]]; then
      docker image rm "$old_id" >>"$LOG" 2>&1 || true # still used by a machine: keep it
    fi
  fi
  push_dc1
}

# push_dc1: tags and pushes the image to dc1, unless dc1 already serves the same digest.
push_dc1() {
  local remote local_digests
  remote=$(curl -sfI -m 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$DC1/v2/$REPO/manifests/$TAG" | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true)
  local_digests=$(docker image inspect -f '{{range .RepoDigests}}{{println .}}{{end}}' "$DOCKVM_BASE_IMAGE")
  if [[ -n $remote ]] && grep -qxF "$DC1/$REPO@$remote" <<<"$local_digests"; then
    say "base-image: $DC1/$DOCKVM_BASE_IMAGE is current"
    return
  fi
  say "base-image: pushing $DC1/$DOCKVM_BASE_IMAGE"
  run docker tag "$DOCKVM_BASE_IMAGE" "$DC1/$DOCKVM_BASE_IMAGE"
  run docker push "$DC1/$DOCKVM_BASE_IMAGE"
}

# cmd_verify: a machine from the image, with only SSH_CAPS, accepts a key on a bridge network
# and keeps its host key across a restart.
cmd_verify() {
  local ip key1 key2 caps=() c
  # Globals: the EXIT trap runs after this function's locals are gone.
  dir=$(mktemp -d) net=dockvm-verify-$$ name=dockvm-verify-$$
  trap 'docker rm -f "$name" >/dev/null 2>&1; docker network rm "$net" >/dev/null 2>&1; rm -rf "$dir"' EXIT
  ssh-keygen -q -t ed25519 -N '' -f "$dir/key"
  for c in "${SSH_CAPS[@]}"; do caps+=(--cap-add "$c"); done
  docker network create "$net" >/dev/null
  docker run -d --name "$name" --network "$net" --cap-drop ALL "${caps[@]}" \
    -e DOCKVM_AUTHORIZED_KEYS="$(cat "$dir/key.pub")" "$DOCKVM_BASE_IMAGE" >/dev/null
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$name")
  wait_until 20 tcp_open "$ip" 22 || die "verify: sshd not listening on $ip:22 ($(docker logs "$name" 2>&1 | tail -n1))"
  _ssh() {
    ssh -q -i "$dir/key" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o ConnectTimeout=5 "root@$ip" "$@"
  }
  # shellcheck disable=SC2016 # expanded on the machine
  _ssh 'echo "verify: ssh root@'"$ip"' ok: $(. /etc/os-release; echo $PRETTY_NAME), $(nproc) cpu"' ||
    die "verify: ssh -i key root@$ip failed ($(docker logs "$name" 2>&1 | tail -n1))"
  if ssh -q -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o PubkeyAuthentication=no -o ConnectTimeout=5 "root@$ip" true 2>/dev/null; then
    die "verify: a login without a key was accepted"
  fi
  key1=$(ssh-keyscan -t ed25519 "$ip" 2>/dev/null)
  docker restart -t 5 "$name" >/dev/null
  wait_until 20 tcp_open "$ip" 22 || die "verify: sshd did not come back after a restart"
  key2=$(ssh-keyscan -t ed25519 "$ip" 2>/dev/null)
  [[ -n $key1 && $key1 == "$key2" ]] || die "verify: the host key changed across a restart"
  say "verify: host key stable across restart; password login refused"
}

case ${1:-build} in
  build) cmd_build ;;
  verify) cmd_verify ;;
  *) echo "usage: $0 build|verify" >&2; exit 2 ;;
esac
