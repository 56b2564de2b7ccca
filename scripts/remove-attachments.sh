#!/bin/sh
# Removes fastlb from this machine's network stack: stops every fastlb@ unit,
# detaches every program fastlb attached in the host's network namespace (the
# balancer's and the backends' decap), which also removes their pins, then
# unmounts fastlb's bpffs when nothing is pinned in it any more.
# The Debian package's prerm runs it on `apt remove` (installed as
# /usr/libexec/fastlb/remove-attachments). Touches nothing fastlb did not attach.
set -u
fastlb=${FASTLB:-/usr/bin/fastlb}
bpffs=/run/fastlb/bpffs

if [ -d /run/systemd/system ]; then
  units=$(systemctl list-units --all --plain --no-legend 'fastlb@*.service' | awk '{print $1}')
  if [ -n "$units" ]; then
    echo "fastlb: stopping $units"
    systemctl stop $units || true
  fi
fi

ifaces() {  # the interfaces in `fastlb [decap] status --json`
  "$fastlb" "$@" status --json 2>/dev/null \
    | python3 -c 'import json, sys; print(" ".join(a["interface"] for a in json.load(sys.stdin)))' 2>/dev/null
}
if mountpoint -q "$bpffs"; then
  for i in $(ifaces); do "$fastlb" detach "$i" || true; done
  for i in $(ifaces decap); do "$fastlb" decap detach "$i" || true; done
  if [ -z "$(find "$bpffs" -mindepth 1 ! -type d 2>/dev/null | head -n 1)" ]; then
    umount "$bpffs" && echo "fastlb: nothing is pinned any more; unmounted $bpffs"
  else
    echo "fastlb: pins are left in $bpffs (another network namespace's attachments?): $(find "$bpffs" -mindepth 1 ! -type d | head -n 5 | tr '\n' ' ')" >&2
  fi
fi
exit 0
