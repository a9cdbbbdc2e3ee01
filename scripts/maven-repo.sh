#!/usr/bin/env bash
# The local Maven repository that releases pull from: a real repository layout under
# $DOCKVM_STATE_DIR/maven, populated with Maven's own `mvn deploy:deploy-file` (so layout,
# maven-metadata.xml and checksums are Maven's), served read-only over HTTP on loopback.
#   scripts/maven-repo.sh up|down|status
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

: "${DOCKVM_MAVEN_PORT:=8090}"
REPO=$STATE/maven
APP_SRC=$REPO_ROOT/examples/demo-app
GROUP=com.example
ARTIFACT=demo-app
# version:start-script; 3.0.0 is the broken release.
VERSIONS=("1.0.0:bin/start" "2.0.0:bin/start" "2.1.0-SNAPSHOT:bin/start" "3.0.0:broken-start")

maven_url() { echo "http://$DOCKVM_HOST:$DOCKVM_MAVEN_PORT"; }
maven_up() { [[ $(http_code "$(maven_url)/") == 200 ]]; }

# The recipe's hash goes into a stamp, so a changed demo app is deployed again.
recipe_hash() { cat "$APP_SRC"/bin/start "$APP_SRC"/server.py "$APP_SRC"/broken-start "$0" | sha256sum | cut -c1-16; }

deployed() {
  local dir="$REPO/${GROUP//.//}/$ARTIFACT/$1"
  [[ -f $dir/.recipe && $(cat "$dir/.recipe") == "$(recipe_hash)" ]] &&
    compgen -G "$dir/$ARTIFACT-*.tar.gz.sha1" >/dev/null
}

pack() {
  local version=$1 start=$2 out=$3 work
  work=$(mktemp -d)
  mkdir -p "$work/bin"
  cp "$APP_SRC/server.py" "$work/"
  cp "$APP_SRC/$start" "$work/bin/start"
  chmod +x "$work/bin/start"
  echo "$version" >"$work/VERSION"
  tar -C "$work" -czf "$out" .
  rm -rf "$work"
}

populate() {
  mkdir -p "$REPO"
  local entry version start dir tarball
  for entry in "${VERSIONS[@]}"; do
    version=${entry%%:*} start=${entry#*:}
    dir="$REPO/${GROUP//.//}/$ARTIFACT/$version"
    if deployed "$version"; then continue; fi
    say "maven: deploying $GROUP:$ARTIFACT:$version"
    tarball=$(mktemp --suffix=.tar.gz)
    pack "$version" "$start" "$tarball"
    mvn -B -q -ntp org.apache.maven.plugins:maven-deploy-plugin:3.1.1:deploy-file \
      -Durl="file://$REPO" -DrepositoryId=local -Dfile="$tarball" \
      -DgroupId=$GROUP -DartifactId=$ARTIFACT -Dversion="$version" -Dpackaging=tar.gz \
      -DgeneratePom=true >>"$LOG_DIR/maven.log" 2>&1 ||
      die "maven: mvn deploy:deploy-file of $version failed (log: $LOG_DIR/maven.log)"
    rm -f "$tarball"
    recipe_hash >"$dir/.recipe"
  done
}

# The war of examples/war-app (a servlet app built by Maven, for the Java flavour's Tomcat):
# 1.0.0, 2.0.0, and 3.0.0 built with -Dbroken=true (its context fails to start).
WAR_SRC=$REPO_ROOT/examples/war-app
WAR_VERSIONS=("1.0.0:false" "2.0.0:false" "3.0.0:true")
war_hash() {
  (cd "$WAR_SRC" && find . -type f ! -path './target/*' -print0 | sort -z | xargs -0 cat
    cat "$REPO_ROOT/scripts/maven-repo.sh") | sha256sum | cut -c1-16
}

populate_war() {
  local entry version broken dir work
  for entry in "${WAR_VERSIONS[@]}"; do
    version=${entry%%:*} broken=${entry#*:}
    dir="$REPO/${GROUP//.//}/war-app/$version"
    if [[ -f $dir/.recipe && $(cat "$dir/.recipe") == "$(war_hash)" ]]; then continue; fi
    say "maven: building and deploying $GROUP:war-app:$version (war)"
    work=$(mktemp -d)
    cp -r "$WAR_SRC/." "$work/"
    (cd "$work" && mvn -B -q -ntp -Drevision="$version" -Dbroken="$broken" package) \
      >>"$LOG_DIR/maven.log" 2>&1 || die "maven: building war-app $version failed (log: $LOG_DIR/maven.log)"
    mvn -B -q -ntp org.apache.maven.plugins:maven-deploy-plugin:3.1.1:deploy-file \
      -Durl="file://$REPO" -DrepositoryId=local -Dfile="$work/target/war-app.war" \
      -DgroupId=$GROUP -DartifactId=war-app -Dversion="$version" -Dpackaging=war \
      -DgeneratePom=true >>"$LOG_DIR/maven.log" 2>&1 ||
      die "maven: mvn deploy:deploy-file of war-app $version failed (log: $LOG_DIR/maven.log)"
    rm -rf "$work"
    war_hash >"$dir/.recipe"
  done
}

cmd_up() {
  ensure_state_dirs
  command -v mvn >/dev/null || die "maven: mvn not installed; run scripts/install.sh"
  populate
  populate_war
  if maven_up; then return 0; fi
  say "maven: serving $REPO on $(maven_url)"
  spawn maven-repo python3 -m http.server "$DOCKVM_MAVEN_PORT" --bind "$DOCKVM_HOST" --directory "$REPO"
  wait_until 15 maven_up ||
    die "maven: repository not answering on $(maven_url) after 15s (log: $LOG_DIR/maven-repo.log)"
}

cmd_down() { stop_pidfile maven-repo 10; }

cmd_status() {
  if maven_up; then echo "up"; else echo "down"; fi
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" ;;
esac
