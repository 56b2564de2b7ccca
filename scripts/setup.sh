#!/usr/bin/env bash
# fastlb set-up for a Debian 12 host, run as root (make setup / test / demo / bench).
#
# Installs what is missing and nothing else, so a second run with nothing
# changed takes a few seconds and prints one line:
#   1. Debian packages: BCC, kernel headers, iproute2, ethtool, the lab peers.
#   2. Kernel headers for BCC: linux-headers-$(uname -r) when Debian has it,
#      otherwise the generic linux-headers-amd64, linked as
#      /lib/modules/$(uname -r)/{build,source} (one line says so).
#   3. A venv at .venv from /usr/bin/python3 with --system-site-packages
#      (BCC's Python module comes from Debian's python3-bpfcc).
#   4. pip install -e . (builds the Cython extension).
#   5. /usr/local/bin/fastlb, pointing into the venv.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
venv="$top/.venv"
stamp="$venv/.fastlb-setup-stamp"
kver=$(uname -r)

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root, because it installs Debian packages and links kernel headers. Fix: sudo make setup"
[ -r /etc/debian_version ] || die "this script knows Debian 12 only (no /etc/debian_version). Install BCC, kernel headers and iproute2 by hand, then run pip install -e ."

# 1. Debian packages ---------------------------------------------------------
packages=(bpfcc-tools python3-bpfcc libbpfcc libbpf1 iproute2 ethtool iputils-ping python3-venv python3-dev
          gcc make procps)
# Peers and tools for the lab and benchmarks (make bench uses them; the tests use some).
packages+=(haproxy nginx libnginx-mod-stream wrk nftables)
# The BGP speaker fastlb drives ([bgp] speaker = "bird"); the ECMP tests run their own copies in namespaces.
packages+=(bird2)
# The metrics scraper the Prometheus test runs in a lab namespace (tests/e2e/test_e2e_prometheus.py).
packages+=(prometheus)
# FTP through a VIP (docs/FTP.md): the tests run vsftpd in the backends' namespaces, and curl is the client.
packages+=(vsftpd curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

headers_pkg="linux-headers-$kver"
if [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
  if apt-cache show "$headers_pkg" >/dev/null 2>&1; then
    missing+=("$headers_pkg")
  else
    headers_pkg=""
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" || missing+=(linux-headers-amd64)
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed. Fix: check the network and /etc/apt/sources.list, then re-run."
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed. Fix: run it by hand to see why, then re-run."
  # The packaged servers start themselves on install; the lab and the benchmarks
  # start their own copies in namespaces, so stop the host's.
  for svc in haproxy nginx; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
    pkill -x "$svc" 2>/dev/null || true
  done
  # Installing bird2 enables and (under systemd) starts the host's BIRD on Debian's sample config.
  # Stop what this run's install started: a box that is to announce VIPs sets BIRD up itself
  # (docs/SCALEOUT.md), and the tests start their own BIRDs in namespaces.
  # Installing prometheus does the same with the host's Prometheus (on :9090), and vsftpd with the
  # host's FTP server (on port 21).
  for pair in bird2:bird prometheus:prometheus vsftpd:vsftpd; do
    pkg=${pair%%:*} svc=${pair#*:}
    [[ " ${missing[*]} " == *" $pkg "* ]] || continue
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$svc" ]; then
      "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

# 2. Kernel headers for BCC (the same script as the Debian package's postinst) --
"$top/scripts/kernel-headers.sh" | sed 's/^fastlb: /setup: /' \
  || die "no kernel headers for BCC. Fix: apt-get install linux-headers-amd64"

# 3-4. The venv and the package ----------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv from /usr/bin/python3 with --system-site-packages"
  /usr/bin/python3 -m venv --system-site-packages "$venv" || die "venv creation failed. Fix: apt-get install python3-venv"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null \
  || die "BCC's Python module is not visible in $venv. Fix: apt-get install python3-bpfcc, then rm -rf $venv and re-run"

# Rebuild only when the inputs changed: pyproject, setup.py, the .pyx sources.
inputs=$(cat "$top/pyproject.toml" "$top/setup.py" $(ls "$top"/fastlb/*/*.pyx "$top"/fastlb/*/*.pxd 2>/dev/null) | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ] || ! "$venv/bin/python" -c "import fastlb.core._core, fastlb.testing._testrun" 2>/dev/null; then
  say "installing fastlb into $venv (pip install -e .[test,lab], builds the Cython core)"
  log="$venv/pip-install.log"
  { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
    && "$venv/bin/python" -m pip install --disable-pip-version-check -e "$top[test,lab]"; } >"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; die "pip install -e . failed (full log: $log). Fix: check access to PyPI and that gcc and python3-dev are installed"; }
  echo "$inputs" > "$stamp"
fi

# 5. fastlb's bpffs, in the host mount namespace, so that pins are shared by every
#    later command, including those started with ip netns exec (see fastlb/kernel/pins.py).
bpffs=/run/fastlb/bpffs
if ! awk -v p="$bpffs" '$5 == p { for (i = 6; i <= NF; i++) if ($i == "-") { if ($(i+1) == "bpf") found = 1; break } } END { exit !found }' /proc/self/mountinfo; then
  mkdir -p "$bpffs" && chmod 700 /run/fastlb "$bpffs"
  mount -t bpf -o mode=0700 bpf "$bpffs" || die "mounting a bpffs at $bpffs failed. Fix: check that the kernel has CONFIG_BPF_SYSCALL and that you are root"
  say "mounted fastlb's bpffs at $bpffs"
fi

# 5b. fastlb's runtime folders at every boot (/run is empty after one): BIRD's include
#     folder, without which BIRD refuses to start (systemd/fastlb.tmpfiles says why).
tmpfiles_rule=/usr/lib/tmpfiles.d/fastlb.conf
if ! cmp -s "$top/systemd/fastlb.tmpfiles" "$tmpfiles_rule"; then
  install -D -m 0644 "$top/systemd/fastlb.tmpfiles" "$tmpfiles_rule"
  say "installed $tmpfiles_rule"
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
  systemd-tmpfiles --create "$tmpfiles_rule" || die "systemd-tmpfiles --create $tmpfiles_rule failed. Fix: run it by hand to see why"
else
  mkdir -p -m 0755 /run/fastlb-bird
fi

# 6. The command on root's PATH -----------------------------------------------
if [ "$(readlink /usr/local/bin/fastlb 2>/dev/null)" != "$venv/bin/fastlb" ]; then
  ln -sfn "$venv/bin/fastlb" /usr/local/bin/fastlb
  say "linked /usr/local/bin/fastlb -> $venv/bin/fastlb"
fi
say "ready ($("$venv/bin/fastlb" --version 2>/dev/null || echo 'fastlb not runnable'))"
