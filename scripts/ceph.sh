#!/usr/bin/env bash
# A one-node Ceph cluster for the registries: one monitor, one manager, one OSD and the RADOS
# Gateway (S3 on loopback), from Debian's packages, without cephadm or systemd.
#
#   ceph.sh up      bootstrap on first run, then start what does not answer (idempotent)
#   ceph.sh down    stop the daemons this script started; data stays
#   ceph.sh status  rows: ceph health, rgw
#   ceph.sh health  HEALTH_OK / HEALTH_WARN ... (exit 1 when the monitor does not answer)
#   ceph.sh bucket SUFFIX / rmbucket SUFFIX   make / remove bucket $DOCKVM_S3_BUCKET_PREFIX$SUFFIX
#
# The OSD is BlueStore on a plain sparse file ($STATE/ceph/osd.0/block, bluestore_block_create):
# this kernel has no device-mapper, so ceph-volume/LVM cannot run, and BlueStore needs no
# filesystem of its own. One OSD, so every pool has size 1 / min_size 1: this cluster protects
# nothing against a lost disk; it gives the registries the production storage API (S3 on RGW).
# Memory (2 cores / 23 GB shared with the rest of the stack): see ceph_conf below and README.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

: "${DOCKVM_CEPH_MON_PORT:=3300}"
: "${DOCKVM_CEPH_RGW_PORT:=7480}"
: "${DOCKVM_CEPH_OSD_SIZE_GB:=20}"
: "${DOCKVM_CEPH_OSD_MEMORY_MB:=512}"
: "${DOCKVM_S3_BUCKET_PREFIX:=dockvm-registry-}"

CEPH_DIR=$STATE/ceph
CONF=$CEPH_DIR/ceph.conf
S3_ENV=$CEPH_DIR/s3.env
MON_ID=a
MGR_ID=x
OSD_ID=0
RGW_NAME=client.rgw.$MON_ID

cephc() { timeout "${CEPH_CLI_TIMEOUT:-20}" ceph -c "$CONF" --connect-timeout 10 "$@"; }

# ceph_conf FSID: the whole configuration. Ceph expands $name/$id itself (hence the \$).
ceph_conf() {
  cat <<EOF
# Written by scripts/ceph.sh; edits are overwritten.
[global]
fsid = $1
mon host = [v2:$DOCKVM_HOST:$DOCKVM_CEPH_MON_PORT]
public addr = $DOCKVM_HOST
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $CEPH_DIR/run
admin socket = $CEPH_DIR/run/\$name.asok
pid file = $CEPH_DIR/run/\$name.pid
log file = $LOG_DIR/ceph-\$name.log
crash dir = $CEPH_DIR/crash
log to stderr = false
err to stderr = true
# One OSD on one host: single-copy pools, placed per OSD, few placement groups.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 10
# 2 cores shared: small thread pools everywhere.
ms async op threads = 1
[mon]
mon data = $CEPH_DIR/mon.\$id
mon memory target = 268435456
mon cluster log file = $LOG_DIR/ceph-cluster.log
[mgr]
mgr data = $CEPH_DIR/mgr.\$id
mgr initial modules = iostat
[osd]
osd data = $CEPH_DIR/osd.\$id
keyring = $CEPH_DIR/osd.\$id/keyring
osd objectstore = bluestore
bluestore block path = $CEPH_DIR/osd.\$id.block
bluestore block create = true
bluestore block size = $((DOCKVM_CEPH_OSD_SIZE_GB * 1024 * 1024 * 1024))
bluestore block db create = false
bluestore block wal create = false
osd memory target = $((DOCKVM_CEPH_OSD_MEMORY_MB * 1024 * 1024))
osd memory cache min = 134217728
osd op num shards = 2
osd op num threads per shard = 1
osd crush update on start = true
[client]
keyring = $CEPH_DIR/\$name.keyring
[$RGW_NAME]
rgw data = $CEPH_DIR/rgw
rgw frontends = beast endpoint=$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT
rgw thread pool size = 32
rgw dynamic resharding = false
rgw enable usage log = false
rgw dns name = $DOCKVM_HOST
EOF
}

mon_up() { CEPH_CLI_TIMEOUT=8 cephc mon stat >/dev/null 2>&1; }
mgr_up() { [[ $(CEPH_CLI_TIMEOUT=8 cephc mgr stat -f json 2>/dev/null | jq -r .available) == true ]]; }
osd_up() { [[ $(CEPH_CLI_TIMEOUT=8 cephc osd stat -f json 2>/dev/null | jq -r .num_up_osds) -ge 1 ]]; }
# pgs_active: every placement group serves I/O (after a restart they peer for a few seconds).
pgs_active() {
  CEPH_CLI_TIMEOUT=8 cephc pg stat -f json 2>/dev/null |
    jq -e '[.pg_summary.num_pg_by_state[] | select(.name | test("^active") | not)] | length == 0' >/dev/null
}
rgw_up() { [[ $(http_code "http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT/") == 200 ]]; }

# start_daemon NAME CHECK SECONDS CMD...: spawn CMD (foreground flavour) unless CHECK passes.
start_daemon() {
  local name=$1 check=$2 secs=$3; shift 3
  # The monitor remembers a stopped daemon as up for a while: our process must be alive too.
  if pid_alive "$RUN_DIR/$name.pid"; then
    "$check" && return 0
  else
    say "ceph: starting $name"
    spawn "$name" "$@"
  fi
  wait_until "$secs" "$check" || die "$name: not ready after ${secs}s (log: $LOG_DIR/$name.log, $LOG_DIR/ceph-*.log)"
}

# bootstrap_mon: keys, monitor map and the monitor's store, once.
bootstrap_mon() {
  local tmp fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  (umask 077 && ceph_conf "$fsid" >"$CONF")
  tmp=$(mktemp -d "$CEPH_DIR/bootstrap.XXXXXX")
  ceph-authtool --create-keyring "$tmp/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$CEPH_DIR/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$tmp/mon.keyring" --import-keyring "$CEPH_DIR/client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:$DOCKVM_HOST:$DOCKVM_CEPH_MON_PORT]" \
    "$tmp/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i "$MON_ID" --monmap "$tmp/monmap" --keyring "$tmp/mon.keyring" \
    >>"$LOG_DIR/ceph-bootstrap.log" 2>&1 || die "ceph: ceph-mon --mkfs failed (log: $LOG_DIR/ceph-bootstrap.log)"
  rm -rf "$tmp"
}

# bootstrap_osd: register osd.0 and make its BlueStore on a file, once. Its uuid and key are
# written first and reused, so that a bootstrap cut before the OSD's first start is simply run
# again (`osd new` with the same uuid, id and key is a no-op). The key goes to the monitor on
# stdin and to the keyring by a shell builtin, never on a command line.
bootstrap_osd() {
  local uuid secret dir=$CEPH_DIR/osd.$OSD_ID
  (umask 077 && mkdir -p "$dir")
  [[ -s $dir/dockvm.uuid ]] || cat /proc/sys/kernel/random/uuid >"$dir/dockvm.uuid"
  uuid=$(<"$dir/dockvm.uuid")
  if [[ ! -s $dir/keyring ]]; then
    secret=$(ceph-authtool --gen-print-key)
    (umask 077 && printf '[osd.%s]\n\tkey = %s\n' "$OSD_ID" "$secret" >"$dir/keyring")
  fi
  secret=$(awk '$1 == "key" { print $3 }' "$dir/keyring")
  printf '{"cephx_secret": "%s"}' "$secret" | cephc osd new "$uuid" "$OSD_ID" -i - >/dev/null ||
    die "ceph: ceph osd new $OSD_ID failed (a cluster from another bootstrap? ceph.sh down, then remove $CEPH_DIR)"
  rm -f "$CEPH_DIR/osd.$OSD_ID.block"
  find "$dir" -mindepth 1 -maxdepth 1 ! -name keyring ! -name dockvm.uuid -exec rm -rf {} +
  ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$uuid" >>"$LOG_DIR/ceph-bootstrap.log" 2>&1 ||
    die "ceph: ceph-osd --mkfs failed (log: $LOG_DIR/ceph-bootstrap.log)"
  touch "$dir/dockvm.ready"
}

# s3_user: the registries' S3 user, made once; its keys kept 0600 in $S3_ENV.
s3_user() {
  [[ -s $S3_ENV ]] && return 0
  local json
  json=$(radosgw-admin -c "$CONF" -n client.admin user info --uid=dockvm 2>/dev/null) ||
    json=$(radosgw-admin -c "$CONF" -n client.admin user create --uid=dockvm \
      --display-name="dockvm registries") || die "ceph: radosgw-admin user create failed"
  (umask 077 && jq -r '.keys[0] | "DOCKVM_S3_ACCESS_KEY=\(.access_key)\nDOCKVM_S3_SECRET_KEY=\(.secret_key)"' \
    <<<"$json" >"$S3_ENV.tmp" && mv "$S3_ENV.tmp" "$S3_ENV")
}

# curl 7.88 signs but does not send the payload hash RGW requires; these calls have no body.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

# s3_curl ARGS...: curl signed with the S3 user's keys; the keys go through a config file on
# stdin, never the command line.
s3_curl() {
  # shellcheck disable=SC1090
  source "$S3_ENV"
  printf 'user = "%s:%s"\n' "$DOCKVM_S3_ACCESS_KEY" "$DOCKVM_S3_SECRET_KEY" |
    curl -s -K - --aws-sigv4 "aws:amz:us-east-1:s3" -H "x-amz-content-sha256: $EMPTY_SHA256" "$@"
}

# s3_bucket SUFFIX: the bucket $DOCKVM_S3_BUCKET_PREFIX$SUFFIX exists (made if missing).
s3_bucket() {
  local code url="http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT/$DOCKVM_S3_BUCKET_PREFIX$1"
  [[ $1 =~ ^[a-z0-9][a-z0-9-]{0,40}$ ]] || die "ceph: bad bucket suffix '$1'"
  [[ $(s3_curl -o /dev/null -w '%{http_code}' -I "$url") == 200 ]] && return 0
  code=$(s3_curl -o /dev/null -w '%{http_code}' -X PUT "$url")
  [[ $code == 200 ]] || die "ceph: creating bucket $DOCKVM_S3_BUCKET_PREFIX$1 answered $code"
}

cmd_up() {
  local t0=$SECONDS
  ensure_state_dirs
  (umask 077 && mkdir -p "$CEPH_DIR/run" "$CEPH_DIR/crash" "$CEPH_DIR/rgw")
  chmod 0700 "$CEPH_DIR"
  chmod -f 0700 "$CEPH_DIR"/*/ || true
  chmod -f 0600 "$CEPH_DIR"/*.keyring "$CEPH_DIR"/*/keyring || true
  if [[ ! -f $CEPH_DIR/mon.$MON_ID/keyring ]]; then
    say "ceph: bootstrapping a new cluster in $CEPH_DIR"
    rm -rf "${CEPH_DIR:?}/mon.$MON_ID" "$CEPH_DIR/osd.$OSD_ID" "$S3_ENV"
    bootstrap_mon
  else
    # Settings may have changed since the bootstrap; the cluster's identity stays.
    (umask 077 && ceph_conf "$(awk '$1 == "fsid" { print $3 }' "$CONF")" >"$CONF.new" && mv "$CONF.new" "$CONF")
  fi
  start_daemon ceph-mon mon_up 30 ceph-mon -f -c "$CONF" -i "$MON_ID"
  if [[ ! -s $CEPH_DIR/mgr.$MGR_ID/keyring ]]; then
    (umask 077 && mkdir -p "$CEPH_DIR/mgr.$MGR_ID" &&
      cephc auth get-or-create "mgr.$MGR_ID" mon 'allow profile mgr' osd 'allow *' \
        mds 'allow *' -o "$CEPH_DIR/mgr.$MGR_ID/keyring" 2>/dev/null)
  fi
  start_daemon ceph-mgr mgr_up 60 ceph-mgr -f -c "$CONF" -i "$MGR_ID" \
    --keyring "$CEPH_DIR/mgr.$MGR_ID/keyring"
  [[ -f $CEPH_DIR/osd.$OSD_ID/dockvm.ready ]] || bootstrap_osd
  start_daemon ceph-osd osd_up 60 ceph-osd -f -c "$CONF" -i "$OSD_ID"
  if [[ ! -s $CEPH_DIR/$RGW_NAME.keyring ]]; then
    (umask 077 && cephc auth get-or-create "$RGW_NAME" mon 'allow rw' osd 'allow rwx' \
      mgr 'allow rw' -o "$CEPH_DIR/$RGW_NAME.keyring" 2>/dev/null)
  fi
  start_daemon ceph-rgw rgw_up 90 radosgw -f -c "$CONF" -n "$RGW_NAME"
  wait_until 60 pgs_active || warn "ceph: placement groups not all active after 60s ($(cmd_health))"
  s3_user
  s3_bucket dc1
  s3_bucket dc2
  say "ceph: up in $((SECONDS - t0))s ($(cmd_health))"
}

cmd_down() {
  local name
  mkdir -p "$RUN_DIR"
  for name in ceph-rgw ceph-osd ceph-mgr ceph-mon; do
    if pid_alive "$RUN_DIR/$name.pid"; then
      say "ceph: stopping $name"
      stop_pidfile "$name" 30
    fi
  done
}

# cmd_rmbucket SUFFIX: removes a bucket and its objects (the tests' own buckets).
cmd_rmbucket() {
  [[ $1 =~ ^[a-z0-9][a-z0-9-]{0,40}$ ]] || die "ceph: bad bucket suffix '$1'"
  radosgw-admin -c "$CONF" -n client.admin bucket rm --bucket="$DOCKVM_S3_BUCKET_PREFIX$1" \
    --purge-objects --bypass-gc >/dev/null 2>&1 || true
}

cmd_health() { CEPH_CLI_TIMEOUT=8 cephc health 2>/dev/null || { echo "no monitor"; return 1; }; }

_row() { printf '%-13s %-46s %s\n' "$1" "$2" "$3"; }

cmd_status() {
  local h rc=0
  h=$(cmd_health) || rc=1
  _row ceph "mon v2:$DOCKVM_HOST:$DOCKVM_CEPH_MON_PORT" "$h"
  if rgw_up; then _row ceph-rgw "http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT" up
  else _row ceph-rgw "http://$DOCKVM_HOST:$DOCKVM_CEPH_RGW_PORT" down; rc=1; fi
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  health) cmd_health ;;
  bucket) s3_bucket "${2:?bucket suffix}" ;;
  rmbucket) cmd_rmbucket "${2:?bucket suffix}" ;;
  *) echo "usage: $0 up|down|status|health|bucket SUFFIX|rmbucket SUFFIX" >&2; exit 2 ;;
esac
