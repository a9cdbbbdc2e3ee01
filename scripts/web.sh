#!/usr/bin/env bash
# Installs the web console's front-end dependencies from npm (web/package-lock.json, npm ci)
# and copies the files the pages load into services/gateway/console/static/vendor: the
# browser never fetches them from a CDN. Idempotent: npm ci runs only when the lockfile changed,
# and a file is copied only when it differs.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

WEB=$REPO_ROOT/web
VENDOR=$REPO_ROOT/services/gateway/console/static/vendor
FILES=(
  uplot/dist/uPlot.iife.min.js
  uplot/dist/uPlot.min.css
  asciinema-player/dist/bundle/asciinema-player.min.js
  asciinema-player/dist/bundle/asciinema-player.css
  htmx.org/dist/htmx.min.js
)

command -v npm >/dev/null || die "web: npm not found (apt-get install npm)"
stamp=$WEB/node_modules/.dockvm-lock.sha256
hash=$(sha256sum "$WEB/package-lock.json" | cut -d' ' -f1)
if [[ -f $stamp && $(<"$stamp") == "$hash" ]]; then
  say "web: npm packages up to date"
else
  say "web: npm ci (web/package-lock.json)"
  (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error) || die "web: npm ci failed"
  echo "$hash" >"$stamp"
fi
mkdir -p "$VENDOR"
for f in "${FILES[@]}"; do
  src=$WEB/node_modules/$f dst=$VENDOR/$(basename "$f")
  [[ -f $src ]] || die "web: $src missing after npm ci"
  cmp -s "$src" "$dst" || install -m 0644 "$src" "$dst"
done
say "web: console assets in ${VENDOR#"$REPO_ROOT"/}"
