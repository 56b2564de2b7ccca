#!/bin/sh
# Kernel headers for BCC, which compiles fastlb's XDP program when it is
# attached and looks for /lib/modules/$(uname -r)/{build,source}.
#
# When the running kernel has no headers of its own (a kernel that Debian did
# not build), link Debian's generic linux-headers-amd64 there and say so in one
# line. Those headers are fine for XDP and the uapi structs fastlb uses.
# Does nothing when the kernel's own headers are in place. Exit status 0 when
# BCC has headers afterwards, 1 (with a line saying what to install) when not.
#
# One copy, used by scripts/setup.sh (make setup) and by the Debian package's
# postinst (installed as /usr/libexec/fastlb/kernel-headers).
set -eu

kver=${1:-$(uname -r)}
mod="/lib/modules/$kver"
if [ -e "$mod/build/Makefile" ] && [ -e "$mod/source/include/linux/kconfig.h" ]; then
  exit 0
fi
generic=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
if [ -z "$generic" ] || [ -z "$common" ]; then
  echo "fastlb: kernel $kver has no headers and no generic ones are under /usr/src; BCC cannot compile fastlb's program. Fix: apt-get install linux-headers-$kver (or linux-headers-amd64)" >&2
  exit 1
fi
# A Debian kernel's own headers package makes build a link into /usr/src; keep
# its source link when it has one and only fill in what is missing.
mkdir -p "$mod"
[ -e "$mod/build/Makefile" ] || ln -sfn "$generic" "$mod/build"
[ -e "$mod/source/include/linux/kconfig.h" ] || ln -sfn "$common" "$mod/source"
echo "fastlb: kernel $kver has no headers package; BCC uses Debian's generic headers: $mod/build -> $(readlink "$mod/build"), $mod/source -> $(readlink "$mod/source")"
