#!/bin/sh
# One-time, idempotent set-up: system packages (apt) and the Python venv in .venv/.
# Called by `make demo` and `make test`; safe to run again (it skips what is done).
set -eu
cd "$(dirname "$0")/.."

# Every package whose files the daemon, the lab, the tests or the benchmarks use;
# tests/unit/test_system_packages.py checks each file's owner (dpkg -S) against this list.
APT_PACKAGES="iproute2 nftables iptables conntrack tcpdump tshark iperf3 socat \
pptpd pptp-linux strongswan-charon strongswan-libcharon strongswan-swanctl libstrongswan \
libstrongswan-standard-plugins libstrongswan-extra-plugins libcharon-extra-plugins \
netsniff-ng hping3 kmod procps util-linux mount coreutils dash dpkg openssl tar tmux prometheus \
coturn keepalived conntrackd \
dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling lintian \
python3-click python3-rich python3-pyroute2 python3-prometheus-client"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    # several worktrees may set up at once: wait for apt's lock instead of failing
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian enables these on install; the lab runs its own instances in namespaces (and only
# prometheus's promtool is wanted: the metrics and alert-rule checks; coturn's STUN server and
# turnutils_natdiscovery run in the lab's namespaces).
for svc in pptpd strongswan-starter strongswan prometheus coturn keepalived conntrackd; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP=.venv/.setup-stamp
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ lab/pyproject.toml -nt "$STAMP" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[dev,pcap]' -e ./lab 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import vpnmasq, vpnmasq_lab, scapy, click, pyroute2' 
    touch "$STAMP"
fi
echo "setup: ready (.venv/bin/vpnmasq)"
