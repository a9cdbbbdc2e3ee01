#!/bin/sh
# Runs inside a container of dockvm/base-systemd:bookworm (network: the host's, for the Debian
# mirror) and adds Java 17 and Tomcat 10 from Debian; build.sh commits the result.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless tomcat10 >/dev/null
src=/tmp/flavour
# A war release becomes Tomcat's ROOT application (dockvm-app below); Debian's own ROOT page
# would shadow it.
rm -rf /var/lib/tomcat10/webapps/ROOT
mv /usr/local/sbin/dockvm-app /usr/local/sbin/dockvm-app-base
install -m 0755 "$src/dockvm-app" /usr/local/sbin/dockvm-app
mkdir -p /etc/systemd/system/tomcat10.service.d
install -m 0644 "$src/tomcat10.conf" /etc/systemd/system/tomcat10.service.d/dockvm.conf
systemctl enable tomcat10.service >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin /var/log/*.log \
	/tmp/flavour
