#!/usr/bin/env bash
# Run on each Distribution replica behind LVS direct routing (keepalived.conf): the replica
# accepts packets for the VIP without answering ARP for it. Idempotent.
set -euo pipefail
VIP=${1:?usage: real-server.sh VIP}
ip addr replace "$VIP/32" dev lo
sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
sysctl -qw net.ipv4.conf.lo.arp_ignore=1 net.ipv4.conf.lo.arp_announce=2
