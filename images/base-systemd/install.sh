#!/bin/sh
# Runs inside a container of dockvm/base:bookworm (network: the host's, for the Debian mirror)
# and turns it into the systemd flavour; build.sh commits the result. The files beside this
# script are in /tmp/flavour.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# systemd-sysv: /sbin/init, reboot, poweroff; dbus: hostnamectl's hostnamed; cron: ops' crontabs.
apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus cron >/dev/null
src=/tmp/flavour
install -m 0755 "$src/dockvm-node-exporter" /usr/local/sbin/dockvm-node-exporter
install -m 0644 "$src/dockvm-ssh-setup.service" "$src/dockvm-app.service" /etc/systemd/system/
for d in ssh prometheus-node-exporter systemd-reboot systemd-exit; do
	mkdir -p "/etc/systemd/system/$d.service.d"
	install -m 0644 "$src/$d.conf" "/etc/systemd/system/$d.service.d/dockvm.conf"
done
# The engine's stop signal (SIGINT) is a clean exit with 143, not a reboot (systemd-exit.conf).
ln -sf /lib/systemd/system/exit.target /etc/systemd/system/ctrl-alt-del.target
systemctl enable dockvm-ssh-setup.service dockvm-app.service ssh.service cron.service \
	prometheus-node-exporter.service
# Nothing to do in a machine: no consoles (the bastion is the way in), no block devices of its
# own to trim or scrub, and no apt run at random times (a release or an op upgrades it).
systemctl mask console-getty.service getty@tty1.service e2scrub_reap.service \
	e2scrub_all.timer fstrim.timer apt-daily.timer apt-daily-upgrade.timer >/dev/null
# Debian's own ssh.socket would answer port 22 beside ssh.service.
systemctl disable ssh.socket >/dev/null 2>&1 || true
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin /var/log/*.log /tmp/flavour
: >/etc/machine-id
