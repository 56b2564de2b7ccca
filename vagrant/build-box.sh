#!/usr/bin/env bash
# Builds a Debian 12 (bookworm) box for Vagrant's libvirt provider from Debian
# packages alone, and adds it under the name vagrant/Vagrantfile uses
# (debian/bookworm64), for machines that cannot download the public box.
#
#   sudo vagrant/build-box.sh            build (or reuse the cached build) and add it
#   sudo vagrant/build-box.sh --no-add   build (or reuse) only; prints the .box path
#
# The box: debootstrap minbase + Debian's kernel, systemd, openssh-server, sudo,
# rsync, ifupdown (DHCP on eth0; net.ifnames=0), python3, BCC (python3-bpfcc) and
# the kernel's headers (slow to unpack under TCG), a serial console, extlinux as
# the boot loader, and a `vagrant` user with Vagrant's insecure key and
# passwordless sudo. The apt timers are masked, so that no background apt run
# holds dpkg's lock when a provisioner or a test installs packages.
#
# The .box is cached in $FASTLB_VM_CACHE (default /var/cache/fastlb-vm) under a
# name keyed by this script's hash: changing the recipe rebuilds it, anything
# else reuses it. Needs root and: debootstrap qemu-utils fdisk extlinux
# syslinux-common e2fsprogs vagrant vagrant-libvirt (scripts/vm-host.sh installs them).
# About 2 minutes and a 1 GiB .box.
set -euo pipefail

say() { echo "build-box: $*"; }
die() { echo "build-box: error: $*" >&2; exit 1; }

add=1
[ "${1:-}" = "--no-add" ] && add=0
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, losetup, mount). Fix: sudo $0"
for tool in debootstrap qemu-img sfdisk extlinux losetup mkfs.ext4; do
  command -v "$tool" >/dev/null || die "$tool is missing. Fix: sudo scripts/vm-host.sh packages"
done

box_name=${FASTLB_BOX_NAME:-debian/bookworm64}
mirror=${FASTLB_BOX_MIRROR:-http://deb.debian.org/debian}
cache=${FASTLB_VM_CACHE:-/var/cache/fastlb-vm}
hash=$(sha256sum "$0" | cut -c1-12)
box="$cache/debian12-$hash.box"
disk_gib=8

build() {
  local work img mnt loop kver
  work=$(mktemp -d "$cache/build.XXXXXX")
  img="$work/disk.raw"
  mnt="$work/root"
  loop=""
  cleanup() {
    set +e
    # Everything mounted under the new root first (debootstrap mounts proc and sys
    # there too); never remove the folder while anything is still mounted in it.
    mountpoint -q "$mnt" && umount -R "$mnt"
    [ -n "$loop" ] && losetup -d "$loop"
    if findmnt -rn -o TARGET | grep -q "^$work/"; then
      echo "build-box: $work still has mounts; left in place" >&2
    else
      rm -rf "$work"
    fi
  }
  trap cleanup EXIT

  say "disk: $img, ${disk_gib} GiB sparse, one bootable partition from 1 MiB"
  truncate -s "${disk_gib}G" "$img"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$img"
  # No nbd module on these kernels: a loop device at the partition's offset instead.
  loop=$(losetup -f --show -o $((2048 * 512)) "$img")
  # syslinux cannot read ext4's 64bit or metadata_csum features.
  mkfs.ext4 -q -L root -O ^64bit,^metadata_csum "$loop"
  mkdir -p "$mnt"
  mount "$loop" "$mnt"

  say "debootstrap bookworm from $mirror (the longest step)"
  debootstrap --variant=minbase \
    --include=linux-image-amd64,systemd-sysv,udev,openssh-server,sudo,rsync,ifupdown,isc-dhcp-client,iproute2,procps,ca-certificates \
    bookworm "$mnt" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (network to $mirror?)"; }

  mount --bind /dev "$mnt/dev"
  mount --bind /dev/pts "$mnt/dev/pts"
  mount -t proc proc "$mnt/proc"
  mount -t sysfs sys "$mnt/sys"

  cat >"$mnt/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # The kernel from the updated suites, so that linux-headers-amd64 (which the
  # guest installs later) matches the running kernel.
  # Also the largest of fastlb's dependencies, which take minutes to unpack under
  # software emulation: Debian's python3, BCC and the kernel's headers. `apt install
  # ./fastlb_*.deb` in the VM still resolves and fetches the rest from the mirror.
  chroot "$mnt" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get -qq update && apt-get -qq -y dist-upgrade \
      && apt-get -qq -y --no-install-recommends install python3 python3-bpfcc linux-headers-amd64 && apt-get -qq clean' \
    >"$work/upgrade.log" 2>&1 || { tail -n 20 "$work/upgrade.log" >&2; die "apt-get dist-upgrade in the new root failed"; }

  echo fastlb-box >"$mnt/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 fastlb-box\n' >"$mnt/etc/hosts"
  echo 'LABEL=root / ext4 errors=remount-ro 0 1' >"$mnt/etc/fstab"
  cat >"$mnt/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

# Vagrant's management NIC. Other NICs are left to whoever uses them.
allow-hotplug eth0
iface eth0 inet dhcp
EOF
  chroot "$mnt" useradd -m -s /bin/bash vagrant
  install -d -m 700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
  key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1)
  [ -n "$key" ] || die "Vagrant's insecure public key is not installed. Fix: apt-get install vagrant"
  install -m 600 -o 1000 -g 1000 "$key" "$mnt/home/vagrant/.ssh/authorized_keys"
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$mnt/etc/sudoers.d/vagrant"
  chmod 440 "$mnt/etc/sudoers.d/vagrant"
  echo 'UseDNS no' >"$mnt/etc/ssh/sshd_config.d/vagrant.conf"
  chroot "$mnt" systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer >/dev/null 2>&1
  chroot "$mnt" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1
  # Host keys are made at first boot of each VM, not baked into the box.
  rm -f "$mnt"/etc/ssh/ssh_host_*
  cat >"$mnt/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Make SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# ed25519 only: an RSA key takes over a minute to make under software emulation (TCG).
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
EOF
  chroot "$mnt" systemctl enable ssh-hostkeys.service >/dev/null 2>&1
  : >"$mnt/etc/machine-id"

  kver=$(ls "$mnt/lib/modules" | sort -V | tail -n 1)
  mkdir -p "$mnt/boot/extlinux"
  cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 1
PROMPT 0
LABEL debian
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=LABEL=root rw console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0 quiet
EOF
  extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1 || die "extlinux --install failed"
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$img" bs=440 count=1 conv=notrunc status=none

  # Only the newest kernel (the upgrade above may have added one), and the blocks
  # of deleted files (the downloaded .debs) handed back, so the image stays small.
  old_kernels=$(chroot "$mnt" dpkg-query -W -f='${Package}\n' 'linux-image-[0-9]*' | grep -v -- "-$kver\$" || true)
  [ -z "$old_kernels" ] || chroot "$mnt" apt-get -qq -y purge $old_kernels >/dev/null 2>&1
  for m in dev/pts dev proc sys; do umount "$mnt/$m"; done
  fstrim "$mnt" || true
  umount "$mnt"
  losetup -d "$loop"
  loop=""

  say "qcow2 and the box archive (kernel $kver)"
  qemu-img convert -O qcow2 "$img" "$work/box.img"
  rm -f "$img"
  printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$disk_gib" >"$work/metadata.json"
  cat >"$work/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
  tar -C "$work" -cf "$box.part" metadata.json Vagrantfile box.img
  mv "$box.part" "$box"
  trap - EXIT
  cleanup
}

mkdir -p "$cache"
if [ -f "$box" ]; then
  say "reusing $box (this recipe's hash $hash)"
else
  t0=$(date +%s)
  build
  say "built $box in $(( $(date +%s) - t0 )) s ($(du -h "$box" | cut -f1))"
fi

if [ "$add" -eq 1 ]; then
  command -v vagrant >/dev/null || die "vagrant is missing. Fix: sudo scripts/vm-host.sh packages"
  vhome=${VAGRANT_HOME:-$HOME/.vagrant.d}
  stamp="$vhome/boxes/${box_name//\//-VAGRANTSLASH-}/0/libvirt/fastlb-box-hash"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    say "box $box_name (libvirt) is already this build"
  else
    vagrant box add --force --name "$box_name" --provider libvirt "$box" >/dev/null
    echo "$hash" >"$stamp"
    # vagrant-libvirt copies a box's image into the storage pool once, under a name with
    # the box's timestamp (a re-added box gets a new copy): drop the copies of older builds.
    if command -v virsh >/dev/null; then
      for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk '{ print $1 }' \
                   | grep "^${box_name//\//-VAGRANTSLASH-}_vagrant_box_image_0_.*_box.img$"); do
        virsh -c qemu:///system vol-delete "$vol" --pool default >/dev/null 2>&1 || true
      done
    fi
    say "added $box as $box_name (libvirt)"
  fi
fi
echo "$box"
