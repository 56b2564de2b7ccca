#!/usr/bin/env bash
# The host side of fastlb's VM (vagrant/, make vm-test), run as root.
#
#   scripts/vm-host.sh packages   install the Debian packages the VM path needs
#   scripts/vm-host.sh start      packages, then virtlogd and libvirtd (when not
#                                 running) and libvirt's default storage pool;
#                                 prints "started" when it started libvirtd
#   scripts/vm-host.sh stop       stop the virtlogd and libvirtd that `start`
#                                 started (their pid files), after taking down
#                                 the libvirt networks that libvirtd activated
#
# On hosts where systemd runs, libvirtd is systemd's business and `start` only
# checks it. Where it does not (containers, these lab machines), the daemons
# run with pid files under /run/fastlb-vm/.
set -euo pipefail

say() { echo "vm-host: $*"; }
die() { echo "vm-host: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root. Fix: sudo $0 $*"

run=/run/fastlb-vm
packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients vagrant vagrant-libvirt debootstrap
          dnsmasq-base iptables fdisk extlinux syslinux-common rsync openssh-client e2fsprogs util-linux)

install_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq || die "apt-get update failed"
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed. Fix: run it by hand to see why"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  if [ -d /run/systemd/system ]; then
    systemctl start libvirtd virtlogd || die "systemctl start libvirtd failed"
  elif ! virsh -c qemu:///system version >/dev/null 2>&1; then
    mkdir -p "$run"
    alive "$run/virtlogd.pid" || virtlogd -d -p "$run/virtlogd.pid"
    libvirtd -d -p "$run/libvirtd.pid"
    for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd did not answer within 10 s"
    echo started
  fi
  if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    mkdir -p /var/lib/libvirt/images
    virsh -c qemu:///system pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh -c qemu:///system pool-autostart default >/dev/null
  fi
  # (no `virsh | grep -q` under pipefail: grep's early exit fails the pipe)
  active=$(virsh -c qemu:///system pool-list --name)
  echo "$active" | tr -d ' ' | grep -qx default || virsh -c qemu:///system pool-start default >/dev/null
}

stop() {
  alive "$run/libvirtd.pid" || { say "no libvirtd of ours is running"; return 0; }
  # Every network this libvirtd activated (autostart or vagrant-libvirt's) has a
  # bridge and a dnsmasq that outlive the daemon: take them down first.
  local net
  for net in $(virsh -c qemu:///system net-list --name | sed '/^$/d'); do
    virsh -c qemu:///system net-destroy "$net" >/dev/null && say "took down libvirt network $net"
  done
  local f pid
  for f in libvirtd virtlogd; do
    alive "$run/$f.pid" || continue
    pid=$(cat "$run/$f.pid")
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$run/$f.pid"
    say "stopped $f ($pid)"
  done
}

case "${1:-}" in
  packages) install_packages ;;
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 packages|start|stop" ;;
esac
