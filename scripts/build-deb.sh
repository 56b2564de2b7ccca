#!/usr/bin/env bash
# make deb: builds dist/fastlb_VERSION_ARCH.deb with Debian's own toolchain
# (debhelper, dh-python's pybuild, Debian's cython3), then runs lintian on it.
#
# Installs the build dependencies it lacks (root), builds in a copy of the
# source tree under build/deb/ (so the working tree stays clean) with Debian's
# /usr/bin/python3 first on PATH, and prints lintian's summary.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "deb: $*"; }
die() { echo "deb: error: $*" >&2; exit 1; }

# Debian's interpreter and tools only: a pyenv or venv python on PATH must not build it.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH

build_deps=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all-dev python3-setuptools
            python3-wheel cython3 click-man python3-click python3-pyroute2 python3-prometheus-client lintian rsync)
missing=()
for p in "${build_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "build dependencies missing: ${missing[*]}. Fix: sudo make deb"
  say "installing build dependencies: ${missing[*]}"
  # A machine whose package lists are old (set-up found nothing missing) would ask the
  # mirror for versions it no longer has.
  apt-get -o DPkg::Lock::Timeout=300 update -qq || die "apt-get update failed. Fix: check the network and /etc/apt/sources.list"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed. Fix: run it by hand to see why"
fi

work="$top/build/deb"
src="$work/fastlb"
rm -rf "$work"
mkdir -p "$src" "$top/dist"
# The files git knows (tracked, and new ones not ignored): a build never ships a venv or a stray .so.
(cd "$top" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$top" && rsync -a --from0 --files-from=- ./ "$src/")
version=$(cd "$src" && dpkg-parsechangelog -S Version)
arch=$(dpkg --print-architecture)
say "building fastlb $version ($arch) in $src"
log="$work/build.log"
(cd "$src" && dpkg-buildpackage -b -us -uc) >"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; die "dpkg-buildpackage failed (full log: $log)"; }
deb="fastlb_${version}_${arch}.deb"
mv "$work/$deb" "$top/dist/$deb"
say "built dist/$deb"
lintian --tag-display-limit 0 "$top/dist/$deb" >"$work/lintian.txt" 2>&1 || true
errors=$(grep -c '^E:' "$work/lintian.txt" || true)
warnings=$(grep -c '^W:' "$work/lintian.txt" || true)
say "lintian: $errors error(s), $warnings warning(s) (full output: build/deb/lintian.txt)"
grep -E '^(E|W):' "$work/lintian.txt" | sed 's/^/  /' || true
[ "$errors" -eq 0 ] || die "lintian reports errors"
