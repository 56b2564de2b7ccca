#!/usr/bin/env bash
# sudo make vm-test: the user's whole path, from the host, in a Debian 12 VM.
#
#   1. host     libvirt running (scripts/vm-host.sh), the Debian box built or
#               reused from its cache (vagrant/build-box.sh)
#   2. headers  the .deb installed in a chroot of the box's disk under this host's
#               kernel: where Debian has no headers package for that kernel (a
#               kernel Debian did not build, like these machines'), postinst must
#               link the generic headers and say so, and BCC must compile
#               fastlb's program with them
#   3. lab      a bridge of this run's own, client and backend namespaces on it
#               (198.18.0.0/15 only), the lab's HTTP/UDP servers on the backends
#   4. vm up    vagrant up: 3 vCPUs (an odd count on purpose), eth1 a virtio NIC
#               with 6 queues (2 per vCPU: virtio-net's XDP needs a TX queue per
#               CPU on top of the 3 it uses) on the bridge; libvirt's qemu driver (TCG) where
#               KVM cannot run the guest (the Vagrantfile decides)
#   5. install  apt install ./fastlb_*.deb in the guest (dependencies from Debian)
#   6. attach   a config in /etc/fastlb/eth1.toml, systemctl enable --now
#               fastlb@eth1; the program must be in driver mode (xdpdrv), and
#               virtio-net must not fall back to its locked XDP_TX mode
#   7. traffic  real TCP and UDP from the client namespaces through the VIPs, DSR
#               and NAT; then the lab's scapy generator from the host, counted
#               by fastlb and at the backends (nftables counters); every frame
#               fastlb forwarded must arrive, and frames the emulated NIC lost
#               before fastlb are counted where they were lost
#   8. restart  held connections, systemctl restart fastlb@eth1 (--keep), a GET on
#               each every 10 s while it runs; the new
#               controller adopts the pinned maps at 3 vCPUs and every held
#               connection answers from the same backend
#   9. remove   apt remove fastlb: no XDP program, no pin, no bpffs left
#  10. cleanup  (trap, also on failure) the VM, the bridge, the namespaces, the
#               servers, the chroot's mounts, and libvirtd if this run started it
#
# Each step prints its time. TCG gives no rate figures: this test is functional.
# Environment: FASTLB_VM_KEEP=1 leaves the VM and lab up for inspection (the
# cleanup commands are printed instead).
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${FASTLB_VM_CACHE:-/var/cache/fastlb-vm}
py="$top/.venv/bin/python"
runid=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
name="flvm-$runid"
bridge="flvmbr$runid"
ns_c="flvm-$runid-c"      # DSR client 198.18.0.1; the generator's frames come from 198.18.0.5 (no host)
ns_n="flvm-$runid-n"      # NAT client 198.18.0.3
ns_b=("flvm-$runid-b1" "flvm-$runid-b2")
addr_b=(198.18.0.11 198.18.0.12)
lb=198.18.0.2
vip_dsr=198.19.0.100
vip_nat=198.19.0.101
gen_frames=3000           # the scapy generator's frames, at gen_rate a second
gen_rate=500
work=$(mktemp -d "/tmp/fastlb-vm-$runid.XXXX")
deb=$(ls "$top"/dist/fastlb_*_amd64.deb 2>/dev/null | sort -V | tail -n 1)

export VAGRANT_HOME="$cache/vagrant.d"
export VAGRANT_DOTFILE_PATH="$work/vagrant"
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CWD="$top/vagrant"
export FASTLB_VM_CPUS=3 FASTLB_VM_MEMORY=1536 FASTLB_VM_BRIDGE="$bridge" FASTLB_VM_NAME="$name" FASTLB_VM_SYNC=0

t_start=$(date +%s)
t_step=$t_start
step_name=""
say() { echo "vm-test: $*"; }
die() { echo "vm-test: FAILED${step_name:+ at '$step_name'}: $*" >&2; exit 1; }
# A failed check whose later steps still mean something (the restart's): say it, go on, fail at the end.
failures=()
fail() { echo "vm-test: FAILED${step_name:+ at '$step_name'}: $*" >&2; failures+=("$step_name: $*"); }
step() {
  local now; now=$(date +%s)
  [ -n "$step_name" ] && say "== $step_name: $((now - t_step)) s"
  step_name=$1; t_step=$now
  [ -n "$step_name" ] && say "== $step_name ..."
  return 0
}
guest() { ssh -F "$work/ssh-config" -o LogLevel=ERROR default "$@"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
json() { "$py" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

[ "$(id -u)" -eq 0 ] || die "needs root (namespaces, a bridge, libvirt). Fix: sudo make vm-test"
[ -n "$deb" ] || die "no dist/fastlb_*_amd64.deb. Fix: sudo make deb"
[ -x "$py" ] || die "no $py for the lab's servers and clients. Fix: sudo make setup"

started_libvirtd=0
root_loop=""
cleanup() {
  local rc=$?
  set +e
  step ""
  mountpoint -q "$work/root" && umount -R "$work/root"   # the chroot's (step 2), even when kept
  [ -n "$root_loop" ] && losetup -d "$root_loop"
  if [ "${FASTLB_VM_KEEP:-0}" = 1 ]; then
    say "FASTLB_VM_KEEP=1: left up. Remove with: VAGRANT_DOTFILE_PATH=$work/vagrant VAGRANT_CWD=$top/vagrant" \
        "VAGRANT_HOME=$VAGRANT_HOME vagrant destroy -f; ip link del $bridge;" \
        "for n in $ns_c $ns_n ${ns_b[*]}; do ip netns del \$n; done"
    return
  fi
  say "cleanup: VM $name, bridge $bridge, namespaces flvm-$runid-*"
  [ -d "$work/vagrant" ] && timeout 300 vagrant destroy -f >"$work/destroy.log" 2>&1
  # Whatever vagrant could not remove (a half-made domain):
  for dom in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep "^$name" ); do
    virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1
    virsh -c qemu:///system undefine "$dom" --remove-all-storage >/dev/null 2>&1
  done
  for ns in "$ns_c" "$ns_n" "${ns_b[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  # The host ends of the namespaces' veths: gone with their namespace, unless a process
  # that was just killed still held it.
  for i in 1 2 3 4; do ip link del "flvm${runid}p$i" 2>/dev/null; done
  ip link del "$bridge" 2>/dev/null
  rm -f "/tmp/$name-console.log"   # the guest's serial console (vagrant/Vagrantfile, TCG only)
  [ "$started_libvirtd" = 1 ] && "$top/scripts/vm-host.sh" stop
  if findmnt -rn -o TARGET | grep -q "^$work/"; then
    say "cleanup: $work still has mounts; left in place"
  else
    rm -rf "$work"
  fi
  say "total $(( $(date +%s) - t_start )) s; $([ $rc -eq 0 ] && echo PASSED || echo FAILED)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. host --------------------------------------------------------------------
step "host: libvirt and the box"
out=$("$top/scripts/vm-host.sh" start) || die "libvirt did not start"
[ "$(echo "$out" | tail -n 1)" = started ] && started_libvirtd=1
"$top/vagrant/build-box.sh" | sed 's/^/  /'
# The guest resolves names through libvirt's dnsmasq, the chroot through the host's
# resolv.conf. Where the host reaches Debian's mirror under a local name (/etc/hosts,
# as on these lab machines), both are told.
mirror_ip=$(getent ahostsv4 deb.debian.org | awk 'NR == 1 { print $1 }')
mirror_in_hosts=$(grep -qw deb.debian.org /etc/hosts && echo "$mirror_ip" || true)

# ---- 2. headers: the .deb on this host's kernel ---------------------------------
kver=$(uname -r)
step "headers: apt install in a chroot of the box's disk, under this host's kernel $kver"
img=$(find "$VAGRANT_HOME/boxes" -path '*bookworm64*/libvirt/box.img' | sort -V | tail -n 1)
[ -n "$img" ] || die "no box image under $VAGRANT_HOME/boxes"
qemu-img convert -O raw "$img" "$work/root.raw"
root_loop=$(losetup -f --show -o $((2048 * 512)) "$work/root.raw")   # the partition (vagrant/build-box.sh)
mkdir "$work/root"
mount "$root_loop" "$work/root"
mount --bind /dev "$work/root/dev"
mount --bind /dev/pts "$work/root/dev/pts"
mount -t proc proc "$work/root/proc"
mount -t sysfs sys "$work/root/sys"
cp /etc/resolv.conf "$work/root/etc/resolv.conf"
[ -n "$mirror_in_hosts" ] && echo "$mirror_in_hosts deb.debian.org" >>"$work/root/etc/hosts"
printf '#!/bin/sh\nexit 101\n' >"$work/root/usr/sbin/policy-rc.d"   # no service starts in a chroot
chmod 755 "$work/root/usr/sbin/policy-rc.d"
cp "$deb" "$work/root/tmp/"
in_root() { chroot "$work/root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
in_root sh -c "apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/$(basename "$deb")" \
  >"$work/chroot-install.log" 2>&1 || { tail -n 30 "$work/chroot-install.log" >&2; die "apt install in the chroot failed"; }
said=$(grep "^fastlb: kernel $kver" "$work/chroot-install.log" || true)
if in_root apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
  say "  Debian has linux-headers-$kver: postinst has nothing to link${said:+, yet it said: $said}"
  [ -z "$said" ] || die "postinst linked generic headers for a kernel that has its own"
else
  say "  postinst: ${said:-(nothing)}"
  echo "$said" | grep -q "has no headers package; BCC uses Debian's generic headers" \
    || die "postinst did not say that it linked the generic headers for kernel $kver"
  in_root test -e "/lib/modules/$kver/build/Makefile" || die "postinst left /lib/modules/$kver/build without a Makefile"
fi
# BCC compiles the installed program against those headers and loads it (into this
# host's kernel, attached nowhere; its maps pinned in a bpffs of the chroot's own).
in_root python3 -c 'from fastlb.testing.testbed import Testbed
with Testbed(name="chroot") as bed:
    print(f"BCC compiled and loaded fastlb_kern.c: program fd {bed.fd}")' 2>"$work/chroot-bcc.log" | sed 's/^/  /' \
  || { tail -n 20 "$work/chroot-bcc.log" >&2; die "BCC could not compile fastlb's program in the chroot"; }
umount -R "$work/root" && losetup -d "$root_loop" && root_loop="" && rm -f "$work/root.raw"

# ---- 3. lab on the host ---------------------------------------------------------
step "lab: bridge $bridge and namespaces"
ip link add "$bridge" type bridge stp_state 0 forward_delay 0
ip link set "$bridge" up
i=0
for ns in "$ns_c" "$ns_n" "${ns_b[@]}"; do
  i=$((i + 1))
  ip netns add "$ns"
  ip link add "flvm${runid}p$i" type veth peer name eth0 netns "$ns"
  ip link set "flvm${runid}p$i" master "$bridge" up
  in_ns "$ns" ip link set lo up
  in_ns "$ns" ip link set eth0 up
  # veth hands over partial checksums; a frame that comes back from the VM's XDP
  # would fail the receiver's check (LAB-NOTES: veth).
  in_ns "$ns" ethtool -K eth0 tx off >/dev/null
done
in_ns "$ns_c" ip addr add 198.18.0.1/24 dev eth0
in_ns "$ns_c" ip route add 198.19.0.0/24 via "$lb"
in_ns "$ns_n" ip addr add 198.18.0.3/24 dev eth0
in_ns "$ns_n" ip route add 198.19.0.0/24 via "$lb"
for j in 0 1; do
  ns=${ns_b[$j]}
  in_ns "$ns" ip addr add "${addr_b[$j]}/24" dev eth0
  # DSR: the VIP on lo, answering no ARP for it (LAB-NOTES: DSR in a namespace lab).
  in_ns "$ns" ip addr add "$vip_dsr/32" dev lo
  in_ns "$ns" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
    net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0
  # NAT: replies to the NAT client go back through the balancer.
  in_ns "$ns" ip route add 198.18.0.3/32 via "$lb"
  # The generator's frames (source 198.18.0.5, UDP 9000) counted at each backend.
  in_ns "$ns" nft -f - <<EOF
table inet fastlb_vm_test {
  counter generated { }
  chain pre { type filter hook prerouting priority -300; ip saddr 198.18.0.5 udp dport 9000 counter name generated; }
}
EOF
  in_ns "$ns" env PYTHONPATH="$top" "$py" -m fastlb.lab.servers --name "b$((j + 1))" --http-port 80 \
    --udp-port 9000 >"$work/server-b$((j + 1)).log" 2>&1 &
done

# ---- 4. the VM ------------------------------------------------------------------
step "vm up: 3 vCPUs, eth1 on $bridge (virtio, 6 queues)"
vagrant up --no-provision >"$work/up.log" 2>&1 || { tail -n 30 "$work/up.log" >&2; die "vagrant up failed"; }
grep -m1 -o "driver type: [a-z]*\|Domain type: *[a-z]*" "$work/up.log" | sed 's/^/  libvirt /' || true
vagrant ssh-config >"$work/ssh-config"
guest true || die "ssh into the guest failed"
say "  guest: $(guest 'uname -r; nproc; ip -br link show eth1' | tr '\n' ' ')"
[ "$(guest nproc)" = 3 ] || die "the guest has $(guest nproc) CPUs, not 3"

# ---- 5. install -----------------------------------------------------------------
step "install: apt install ./$(basename "$deb")"
scp -F "$work/ssh-config" -o LogLevel=ERROR "$deb" default:/tmp/ >/dev/null
if [ -n "$mirror_ip" ] && [ "$(guest "getent ahostsv4 deb.debian.org | awk 'NR == 1 { print \$1 }'")" != "$mirror_ip" ]; then
  guest "echo '$mirror_ip deb.debian.org' | sudo tee -a /etc/hosts >/dev/null"
  say "  deb.debian.org is $mirror_ip for the host; the guest's /etc/hosts says so too"
fi
guest "cd /tmp && sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./$(basename "$deb")" \
  >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; die "apt install failed"; }
grep -E "^fastlb: |Setting up fastlb" "$work/install.log" | sed 's/^/  /'
say "  dependencies as resolved in the guest:"
guest "dpkg-query -W -f='\${Package} \${Version}\n' fastlb python3 python3-bpfcc libbpfcc libbpf1 python3-pyroute2 \
  python3-click python3-prometheus-client iproute2 linux-headers-amd64 ethtool 2>/dev/null" | sed 's/^/    /'
guest "test -x /usr/bin/fastlb && test -f /usr/share/man/man1/fastlb-attach.1.gz && test -f /usr/share/bash-completion/completions/fastlb \
  && test -f /usr/lib/python3/dist-packages/fastlb/bpf/fastlb_kern.c && test -d /run/fastlb-bird" \
  || die "the installed package lacks a file (fastlb, man page, completion, BPF sources or tmpfiles' folder)"

# ---- 6. attach ------------------------------------------------------------------
step "attach: systemctl enable --now fastlb@eth1"
guest "sudo ip addr add $lb/24 dev eth1 && sudo ip link set eth1 up"
backends=""
for a in "${addr_b[@]}"; do backends+=$'\n[[vip.backend]]\naddress = "'"$a"$'"\n'; done
vip() {  # address port protocol forwarding health-kind
  printf '\n[[vip]]\naddress = "%s"\nport = %s\nprotocol = "%s"\nforwarding = "%s"\n[vip.health]\nkind = "%s"\ninterval = 1.0\n%s' \
    "$1" "$2" "$3" "$4" "$5" "$backends"
}
{
  echo "# written by tests/vm/run.sh (run $runid)"
  printf '[settings]\nhash_seed = %s\n' "$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
  vip "$vip_dsr" 80 tcp dsr tcp
  vip "$vip_dsr" 9000 udp dsr udp
  vip "$vip_nat" 80 tcp nat tcp
  vip "$vip_nat" 9000 udp nat udp
} >"$work/eth1.toml"
scp -F "$work/ssh-config" -o LogLevel=ERROR "$work/eth1.toml" default:/tmp/eth1.toml >/dev/null
guest "sudo install -m 644 /tmp/eth1.toml /etc/fastlb/eth1.toml && sudo fastlb check -c /etc/fastlb/eth1.toml" | sed 's/^/  /'
guest "sudo systemctl enable --now fastlb@eth1" 2>&1 | sed 's/^/  /' \
  || { guest "sudo journalctl -u fastlb@eth1 --no-pager | tail -n 30" >&2; die "fastlb@eth1 did not start"; }
link=$(guest "ip -d link show eth1")
mode=$(guest "sudo fastlb status --json" | json 'd[0]["mode"]')
say "  fastlb status: mode $mode; ip link: $(echo "$link" | grep -o 'xdp[a-z]*' | sort -u | tr '\n' ' ');" \
    "eth1 queues (ethtool, which the package brought): $(guest "/usr/sbin/ethtool -l eth1 | sed -n '/Current/,\$p' \
    | awk '/Combined/ { print \$2 }'")"
[ "$mode" = native ] || die "fastlb runs in $mode mode on virtio-net, not native (driver)"
echo "$link" | grep -q xdpgeneric && die "ip link shows xdpgeneric on eth1"
echo "$link" | grep -qw xdp || die "ip link shows no driver-mode program on eth1"
kernel=$(guest "sudo journalctl -k --no-pager -o cat | grep -i 'xdp' | tail -n 3" || true)
[ -n "$kernel" ] && sed 's/^/  kernel: /' <<<"$kernel"
grep -q "locked tx mode" <<<"$kernel" && die "virtio-net runs XDP_TX in its locked mode (too few queues for 3 vCPUs)"
guest "sudo journalctl -u fastlb@eth1 --no-pager -o cat | tail -n 8" | sed 's/^/  fastlb@eth1: /'

# ---- 7. traffic -----------------------------------------------------------------
step "traffic: TCP and UDP through the VIPs, DSR and NAT"
in_ns "$ns_c" "$py" -m fastlb.lab.client_worker wait --target "${addr_b[0]}" 80 --target "${addr_b[1]}" 80 --timeout 20 >/dev/null \
  || die "the backends' servers did not come up"
# The health checks must see both backends up before the counts mean anything.
for _ in $(seq 1 60); do
  up=$(guest "sudo fastlb stats --json" | json 'sum(1 for v in d[0]["vips"] for b in v["backends"] if b["health"] == "up")' 2>/dev/null || echo 0)
  [ "$up" -ge 8 ] && break
  sleep 1
done
check_counts() {  # what json-of-client
  local what=$1 out=$2
  echo "$out" | json '"ok" if not d.get("error") and len(d["counts"]) == 2 else "bad"' | grep -qx ok \
    || die "$what: $out"
  say "  $what: $(echo "$out" | json 'dict(d["counts"])')"
}
PY_C="env PYTHONPATH=$top $py -m fastlb.lab.client_worker"
check_counts "DSR TCP 200 connections (GET /)" "$(in_ns "$ns_c" $PY_C tcp --host $vip_dsr --port 80 --count 200 --timeout 5)"
check_counts "DSR UDP 200 datagrams" "$(in_ns "$ns_c" $PY_C udp --host $vip_dsr --port 9000 --count 200 --timeout 5)"
check_counts "NAT TCP 200 connections (GET /)" "$(in_ns "$ns_n" $PY_C tcp --host $vip_nat --port 80 --count 200 --timeout 5)"
check_counts "NAT UDP 200 datagrams" "$(in_ns "$ns_n" $PY_C udp --host $vip_nat --port 9000 --count 200 --timeout 5)"

step "traffic: the lab's scapy generator from the host, counted by fastlb and at the backends"
lb_mac=$(guest "cat /sys/class/net/eth1/address")
c_mac=$(in_ns "$ns_c" cat /sys/class/net/eth0/address)
forwarded() { guest "sudo fastlb stats --json" | json "sum(b['packets'] for v in d[0]['vips'] if v['vip'] == '$vip_dsr:9000/udp' for b in v['backends'])"; }
# Where a frame can be lost before fastlb sees it: the host's tap of the VM's eth1 (QEMU
# did not take it) and the guest's eth1 (its ring was full while TCG held the vCPU).
tap=$(ip -o link show master "$bridge" | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -v "^flvm" | head -n 1)
drops() {
  echo "$( [ -n "$tap" ] && cat "/sys/class/net/$tap/statistics/tx_dropped" || echo 0)" \
       "$(guest "cat /sys/class/net/eth1/statistics/rx_dropped")"
}
read -r tap0 rx0 <<<"$(drops)"
before=$(forwarded)
gen=$(in_ns "$ns_c" env PYTHONPATH="$top" "$py" -m fastlb.lab.linerate --scapy --rate "$gen_rate" --ifname eth0 \
  --src-mac "$c_mac" --dst-mac "$lb_mac" --src 198.18.0.5 --dst "$vip_dsr" --port 9000 --flows 64 \
  --packets "$gen_frames" --seconds 30) || die "generator: $gen"
sent=$(echo "$gen" | json 'd["sent"]')
counted=0; per=""
for _ in $(seq 1 20); do   # TCG: let the guest drain its queues
  counted=0; per=""
  for j in 0 1; do
    n=$(in_ns "${ns_b[$j]}" nft -j list counter inet fastlb_vm_test generated | json '[x["counter"]["packets"] for x in d["nftables"] if "counter" in x][0]')
    per+="b$((j + 1)) $n "; counted=$((counted + n))
  done
  [ "$counted" -ge "$sent" ] && break
  sleep 0.5
done
fwd=$(( $(forwarded) - before ))
read -r tap1 rx1 <<<"$(drops)"
say "  scapy sent $sent frames of 64 flows at $gen_rate a second; fastlb forwarded $fwd; the backends counted" \
    "$counted ($per)"
[ "$fwd" = "$sent" ] || say "  lost before fastlb: $((sent - fwd)) (the host's tap ${tap:-?} dropped $((tap1 - tap0))," \
    "the guest's eth1 $((rx1 - rx0)); the emulated NIC, at idle it took every frame)"
[ "$sent" = "$gen_frames" ] || die "the generator sent $sent frames, not $gen_frames"
# Every frame fastlb forwarded reaches a backend, and none is counted twice. The emulated
# NIC in front of fastlb can lose some when TCG holds a vCPU (73 of 3,000 once), so the
# share that reached fastlb is bounded, not exact.
[ "$fwd" -le "$sent" ] || die "fastlb forwarded $fwd frames, more than the $sent generated"
[ "$counted" -le "$fwd" ] || die "the backends counted $counted frames, more than the $fwd fastlb forwarded"
[ "$((2 * counted))" -ge "$sent" ] || die "only $counted of the $sent generated frames reached the backends"
case "$per" in *" 0 "*|"b1 0 "*) die "one backend got none of the generator's 64 flows: $per" ;; esac

# ---- 8. restart -----------------------------------------------------------------
step "restart: systemctl restart fastlb@eth1 adopts the pinned maps at 3 vCPUs, held connections stay"
coproc HOLD { in_ns "$ns_c" $PY_C hold --host "$vip_dsr" --port 80 --count 30 --requests --timeout 5; }
read -r -t 120 held <&"${HOLD[0]}" || die "holding connections timed out"
echo "$held" | grep -q '"held"' || die "holding connections: $held"
echo detail >&"${HOLD[1]}"; read -r -t 60 d1 <&"${HOLD[0]}" || die "the held connections did not answer"
prog1=$(guest "sudo fastlb status --json" | json 'd[0]["prog_id"]')
t0=$(date +%s%N)
# The restart recompiles the program with BCC: minutes under TCG, longer than the
# lab servers keep an idle connection (30 s). So the held connections make a
# request every 10 s while it runs (which also shows that none fails meanwhile).
guest "sudo systemctl restart fastlb@eth1" </dev/null & restart_pid=$!
checks=0; check_failed=0
while kill -0 "$restart_pid" 2>/dev/null; do
  sleep 10
  echo check >&"${HOLD[1]}"; read -r -t 60 c <&"${HOLD[0]}" || c='{"ok": 0, "failed": 30}'
  checks=$((checks + 1))
  check_failed=$((check_failed + $(echo "$c" | json 'd["failed"]')))
done
wait "$restart_pid" \
  || { guest "sudo journalctl -u fastlb@eth1 --no-pager -o cat | tail -n 8" | sed 's/^/  fastlb@eth1: /' >&2; fail "systemctl restart fastlb@eth1 failed"; }
say "  systemctl restart returned after $(( ($(date +%s%N) - t0) / 1000000 )) ms; meanwhile $checks rounds of" \
    "30 keep-alive GETs on the held connections, $check_failed failed"
[ "$check_failed" -eq 0 ] || fail "$check_failed requests on held connections failed during the restart"
echo detail >&"${HOLD[1]}"; read -r -t 120 d2 <&"${HOLD[0]}" || d2='{"connections": []}'
prog2=$(guest "sudo fastlb status --json" | json 'd[0]["prog_id"]' || echo none)
eval "exec ${HOLD[1]}>&-"
cmp=$(printf '%s\n%s\n' "$d1" "$d2" | "$py" -c '
import json, sys
a, b = (json.loads(line)["connections"] for line in sys.stdin)
same = sum(1 for x, y in zip(a, b) if x["backend"] and x["backend"] == y["backend"] and not y["error"])
errs = [y["error"] for y in b if y["error"]][:3]
print(f"{same}/{len(a)} held connections answered from the same backend after the restart; errors: {errs or None}")' \
  || echo "no answer from the held connections after the restart")
say "  $cmp"
say "  program id $prog1 -> $prog2 (the program is replaced through its link; the maps stay)"
guest "sudo journalctl -u fastlb@eth1 --no-pager -o cat | grep -i -E 'adopt|conntrack|max_entries|refus' | tail -n 4" \
  | sed 's/^/  fastlb@eth1: /' || true
guest "sudo journalctl -u fastlb@eth1 --no-pager -o cat | grep -qi 'adopted the running attachment'" \
  || fail "the restarted controller did not say it adopted the running attachment"
case "$cmp" in "30/30 "*) ;; *) fail "held connections did not survive the restart: $cmp" ;; esac
guest "python3 -c 'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:9469/metrics\", timeout=5).read().decode())'" \
  | grep -c '^fastlb_' | sed 's/^/  metrics: series on 127.0.0.1:9469: /'

# ---- 9. remove ------------------------------------------------------------------
step "remove: apt remove fastlb"
guest "sudo DEBIAN_FRONTEND=noninteractive apt-get remove -y -q fastlb" >"$work/remove.log" 2>&1 \
  || { tail -n 20 "$work/remove.log" >&2; die "apt remove failed"; }
grep "^fastlb: " "$work/remove.log" | sed 's/^/  /'
left=$(guest "ip -d link | grep -o -E 'xdp[a-z]*|prog/xdp id [0-9]+'; grep -o ' /run/fastlb/bpffs ' /proc/self/mountinfo; \
  sudo find /run/fastlb/bpffs /sys/fs/bpf -mindepth 1 ! -type d 2>/dev/null; \
  sudo systemctl is-active fastlb@eth1 | grep -x active" || true)
[ -z "$left" ] || die "left after apt remove: $left"
say "  no XDP program, no pin, no fastlb bpffs, no running unit"
step ""
if [ ${#failures[@]} -gt 0 ]; then
  printf 'vm-test: failed check: %s\n' "${failures[@]}" >&2
  exit 1
fi
