"""Where fastlb pins its BPF objects, and the bpffs that holds them.

Pins live in a bpffs of fastlb's own at ``/run/fastlb/bpffs``, mounted in the
host's mount namespace (``make setup`` mounts it; so does the first fastlb
command run there). ``ip netns exec`` gives each command a private mount
namespace and a fresh ``/sys``, so ``/sys/fs/bpf`` is not shared between
invocations, but a bpffs mounted under ``/run`` before them is. A bpffs that
fastlb mounted inside such a private namespace would vanish with the command
and take the pins (and the XDP link) along, so fastlb refuses to do that and
says how to mount it in the host namespace instead.

Each attachment gets a folder ``<root>/net<netns inode>/<ifname>/`` holding
the program's maps, the program (``prog``) and the XDP link (``link``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
from pathlib import Path

from fastlb.errors import BpfError, PrivilegeError, os_error
from fastlb.kernel import bpfsys

DEFAULT_ROOT = "/run/fastlb/bpffs"
LINK_PIN = "link"
PROG_PIN = "prog"


def root() -> Path:
    """The pin root (``FASTLB_PIN_ROOT`` overrides the default)."""
    return Path(os.environ.get("FASTLB_PIN_ROOT", DEFAULT_ROOT))


def is_bpffs(path: Path) -> bool:
    """True when ``path`` is a bpffs mount point in this mount namespace."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target and fields[sep + 1] == "bpf":
                return True
    return False


def in_private_mount_ns() -> bool:
    """True when this process's mount namespace differs from its parent's (ip netns exec)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False


def _mount_bpffs(path: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if libc.mount(b"bpf", os.fsencode(str(path)), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def ensure_bpffs() -> Path:
    """The pin root, mounting fastlb's bpffs there first if needed, and without
    the pins of namespaces that are gone."""
    base = root()
    if is_bpffs(base):
        collect_stale(base)
        return base
    if os.geteuid() != 0:
        raise PrivilegeError(f"mounting a bpffs at {base} needs root", fix="run fastlb as root (sudo)")
    if in_private_mount_ns():
        raise BpfError(
            f"no bpffs is mounted at {base}, and this command runs in a private mount namespace "
            "(ip netns exec?) where a new mount would vanish with it, taking the pins along",
            fix=f"mount it once in the host namespace: sudo mkdir -p {base} && sudo mount -t bpf bpf {base} "
                "(sudo make setup does this)")
    try:
        _mount_bpffs(base)
    except OSError as exc:
        raise BpfError(f"cannot mount a bpffs at {base}: {os_error(exc)}",
                       fix=f"mount one yourself: mount -t bpf bpf {base}") from exc
    return base


def netns_id() -> str:
    """This process's network namespace, as a folder name."""
    return "net" + str(os.stat("/proc/self/ns/net").st_ino)


def attachment_dir(ifname: str, base: Path | None = None, kind: str = "") -> Path:
    """The pin folder of fastlb's attachment to ``ifname`` in this netns.

    ``kind`` "decap" names the backends' decap program's folders, kept apart
    from the balancer's.
    """
    if "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"bad interface name {ifname!r}")
    return _netns_dir(base, kind) / ifname


def _netns_dir(base: Path | None, kind: str) -> Path:
    prefix = f"{kind}-" if kind else ""
    return (base or root()) / f"{prefix}{netns_id()}"


def attachments(base: Path | None = None, kind: str = "") -> list[str]:
    """Interface names with a fastlb pin folder (of ``kind``) in this netns."""
    folder = _netns_dir(base, kind)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


_NETNS_DIR = re.compile(r"(?:[a-z]+-)?net(\d+)")


def live_netns_inodes() -> set[int]:
    """Inodes of the network namespaces that exist: those of a process, or bind-mounted
    (ip netns, container runtimes)."""
    inodes = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            m = re.search(r" net:\[(\d+)\] ", line)
            if m:
                inodes.add(int(m.group(1)))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                inodes.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass  # the process is gone, or not ours to see
    try:
        names = os.listdir("/run/netns")
    except OSError:
        names = []
    for name in names:
        try:
            inodes.add(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    return inodes


def collect_stale(base: Path | None = None) -> list[Path]:
    """Remove the pin folders of network namespaces that no longer exist.

    Their interfaces went with the namespace, so the programs are detached
    already; the pins would only keep the maps and programs in memory.
    Returns the folders removed.
    """
    base = base or root()
    live = live_netns_inodes()
    removed = []
    for folder in base.iterdir():
        m = _NETNS_DIR.fullmatch(folder.name)
        if not m or not folder.is_dir() or folder.is_symlink() or int(m.group(1)) in live:
            continue
        attachments = [a for a in folder.iterdir() if not _link_attached(a)]
        if len(attachments) != len(list(folder.iterdir())):
            continue  # a link still holds an interface: the namespace lives on somewhere
        for attachment in attachments:
            remove_dir(attachment)  # also removes the folder once it is empty
        if folder.exists():
            folder.rmdir()
        removed.append(folder)
    return removed


def _link_attached(attachment: Path) -> bool:
    """True when the attachment's pinned XDP link still names an interface."""
    link = attachment / LINK_PIN
    if not link.exists():
        return False
    try:
        fd = bpfsys.obj_get(str(link))
    except OSError:
        return False
    try:
        return bpfsys.link_info(fd).ifindex != 0
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Unpin everything in an attachment folder (bpffs: unlink each pin)."""
    if not path.exists():
        return
    if path.is_symlink():
        raise BpfError(f"{path} is a symlink; fastlb only removes its own pin folders",
                       fix="remove it by hand after checking where it points")
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    path.rmdir()
    parent = path.parent
    try:
        parent.rmdir()  # the netns folder, once empty
    except OSError:
        pass
