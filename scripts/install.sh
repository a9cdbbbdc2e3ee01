#!/usr/bin/env bash
# Installs what the local stack and the tests need: Debian packages, FerretDB and the venv.
# Idempotent: each step checks first, so a second run installs nothing and takes seconds.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

FERRETDB_VERSION=v1.24.2
FERRETDB_MODULE=github.com/FerretDB/FerretDB
PYTHON=${DOCKVM_PYTHON:-python3}
GOBIN=${DOCKVM_GOBIN:-/usr/local/bin}

APT_PACKAGES=(
  docker.io rabbitmq-server docker-registry lxcfs fuse3 xfsprogs skopeo debootstrap
  openvswitch-switch iproute2 iptables tini curl jq maven ca-certificates git make procps
  psmisc util-linux openssh-client python3 python3-venv nftables gettext-base
  prometheus prometheus-alertmanager docker-compose
  chromium
)
# Ceph and HAProxy for the registries (scripts/ceph.sh, scripts/registry.sh), without their
# recommends: ceph-mgr's pull in the dashboard and scikit-learn, minutes of install for nothing.
APT_LEAN_PACKAGES=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common haproxy)

# install_apt_packages [--no-install-recommends] PACKAGE...: installs those missing.
install_apt_packages() {
  local missing=() p flags=()
  [[ $1 != --no-install-recommends ]] || { flags=("$1"); shift; }
  for p in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    say "install: debian packages present"
    return
  fi
  say "install: apt-get install ${missing[*]} (log: $LOG_DIR/install-apt.log)"
  ensure_state_dirs
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a
  # No init system here: keep package scripts from starting daemons; stack.sh starts them.
  local own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  # A third-party source that cannot be reached must not stop the Debian ones.
  apt-get update -q >>"$LOG_DIR/install-apt.log" 2>&1 ||
    warn "apt-get update reported errors; trying the install anyway"
  local rc=0
  apt-get install -y -q "${flags[@]}" -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$LOG_DIR/install-apt.log" 2>&1 || rc=$?
  ((own_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "install: apt-get install failed (exit $rc) for: ${missing[*]} (log: $LOG_DIR/install-apt.log)"
}

ferretdb_ok() {
  local out
  out=$("$GOBIN/ferretdb" --version 2>/dev/null) && grep -qx "version: $FERRETDB_VERSION" <<<"$out"
}

# `go install $FERRETDB_MODULE/cmd/ferretdb@$FERRETDB_VERSION` yields a binary that panics at
# start: FerretDB embeds build/version/version.txt, which its release process generates and the
# module zip lacks. So this builds the same module source, with that one file written, into
# $GOBIN (/usr/local/bin, on the stack's PATH).
install_ferretdb() {
  if ferretdb_ok; then
    say "install: ferretdb $FERRETDB_VERSION present"
    return
  fi
  command -v go >/dev/null || die "install: go not found (expected /usr/local/go/bin/go); needed to build ferretdb"
  say "install: building ferretdb $FERRETDB_VERSION with go (a minute or two)"
  local dir src work
  dir=$(go mod download -json "$FERRETDB_MODULE@$FERRETDB_VERSION" | jq -r .Dir) ||
    die "install: go mod download $FERRETDB_MODULE@$FERRETDB_VERSION failed"
  work=$(mktemp -d /var/tmp/dockvm-ferretdb.XXXXXX)
  src=$work/src
  cp -r "$dir" "$src"
  chmod -R u+w "$src"
  echo "$FERRETDB_VERSION" >"$src/build/version/version.txt"
  echo "go-install" >"$src/build/version/package.txt"
  (cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -o "$work/ferretdb" ./cmd/ferretdb) ||
    die "install: building ferretdb failed"
  mkdir -p "$GOBIN"
  install -m 0755 "$work/ferretdb" "$GOBIN/ferretdb"
  rm -rf "$work"
  ferretdb_ok || die "install: $GOBIN/ferretdb does not report $FERRETDB_VERSION"
}

install_venv() {
  local venv=$REPO_ROOT/.venv stamp hash
  if [[ ! -f $REPO_ROOT/pyproject.toml ]]; then
    warn "install: no pyproject.toml yet; skipping the venv"
    return
  fi
  stamp=$venv/.dockvm-pyproject.sha256
  hash=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)
  if [[ -x $venv/bin/python && -f $stamp && $(<"$stamp") == "$hash" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
    say "install: venv up to date"
    return
  fi
  if ! "$venv/bin/python" -c '' 2>/dev/null; then
    say "install: creating $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || die "install: $PYTHON -m venv failed"
  fi
  say "install: pip install -e '.[dev]' (log: $LOG_DIR/install-pip.log)"
  ensure_state_dirs
  rm -f "$stamp"
  "$venv/bin/python" -m pip install -q --upgrade pip >>"$LOG_DIR/install-pip.log" 2>&1 ||
    warn "install: could not upgrade pip; going on with the bundled one"
  (cd "$REPO_ROOT" && "$venv/bin/python" -m pip install -q -e '.[dev]' >>"$LOG_DIR/install-pip.log" 2>&1) ||
    die "install: pip install -e '.[dev]' failed (log: $LOG_DIR/install-pip.log)"
  echo "$hash" >"$stamp"
}

install_apt_packages "${APT_PACKAGES[@]}"
install_apt_packages --no-install-recommends "${APT_LEAN_PACKAGES[@]}"
install_ferretdb
install_venv
# The web console's JavaScript and CSS, from npm's lockfile (scripts/web.sh).
"$REPO_ROOT/scripts/web.sh"
say "install: done"
