"""The controller's control socket: live changes without a restart.

Each ``fastlb attach`` listens on a Unix socket of its own,
``/run/fastlb/ctl/net<netns inode>/<ifname>.sock`` (``FASTLB_CTL_ROOT``
overrides the root), mode 0600 in a folder of mode 0700, both owned by
root; the server also checks each peer's uid (SO_PEERCRED). A path-named
Unix socket is reachable from every network namespace that sees the file,
so ``ip netns exec`` commands find their own namespace's controller by the
netns inode, as the pins do.

The protocol is one JSON object per line each way: a request
``{"cmd": "backend.weight", ...}`` and a reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "fix": "..."}``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from fastlb.errors import FastlbError, os_error
from fastlb.kernel import pins

DEFAULT_ROOT = "/run/fastlb/ctl"
MAX_REQUEST = 1 << 20
TIMEOUT = 30.0


class ControlError(FastlbError):
    """The control socket could not be reached, or the controller refused a command."""


class NoController(ControlError):
    """No controller runs for the interface (no socket, or a stale one): the maps may still be read."""


def root() -> Path:
    return Path(os.environ.get("FASTLB_CTL_ROOT", DEFAULT_ROOT))


def socket_path(ifname: str) -> Path:
    if "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"bad interface name {ifname!r}")
    return root() / pins.netns_id() / f"{ifname}.sock"


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Server:
    """Accepts requests on the socket of ``ifname`` and answers them with ``handle(request)``.

    ``handle`` runs on the server's thread; it returns the reply dict, or
    raises FastlbError, which becomes ``{"ok": false, ...}``.
    """

    def __init__(self, ifname: str, handle: Callable[[dict], dict]):
        self.path = socket_path(ifname)
        self.handle = handle
        folder = self.path.parent
        for d in (root(), folder):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"another fastlb controller is running on {ifname} (socket {self.path})",
                                   fix=f"stop it first (systemctl stop fastlb@{ifname}, or SIGTERM its "
                                       "fastlb attach), or talk to it: fastlb stats")
            self.path.unlink()  # left by a controller that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, name="fastlb-control", daemon=True)
        self.closed = False

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._one(conn)
                except OSError:
                    pass  # the client went away; nothing to answer

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != 0:
            reply = {"ok": False, "error": f"uid {uid} may not use the control socket {self.path}",
                     "fix": "run fastlb as root (sudo)"}
        else:
            reply = self._answer(_read_line(conn))
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, raw: bytes) -> dict:
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("not an object with a 'cmd' string")
        except ValueError as exc:
            return {"ok": False, "error": f"malformed request: {exc}",
                    "fix": "use the fastlb command line, which speaks this protocol"}
        try:
            reply = self.handle(request)
        except FastlbError as exc:
            return {"ok": False, "error": exc.message, "fix": exc.fix}
        return {"ok": True, **reply}

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise OSError(errno.EMSGSIZE, "request too long")
    return data


def find(ifname: str | None = None) -> tuple[str, Path]:
    """The (interface, socket path) of the controller to talk to in this network namespace."""
    if ifname is not None:
        return ifname, socket_path(ifname)
    folder = root() / pins.netns_id()
    try:
        names = sorted(p.name.removesuffix(".sock") for p in folder.iterdir() if p.name.endswith(".sock"))
    except FileNotFoundError:
        names = []
    except PermissionError as exc:
        raise ControlError(f"permission denied reading {folder}: the control sockets are root-only",
                           fix="run it as root: sudo fastlb ...") from exc
    if not names:
        raise NoController("no fastlb controller is running in this network namespace",
                           fix="start one: fastlb attach IFACE -c CONFIG (the changes are made through it)")
    if len(names) > 1:
        raise ControlError(f"fastlb controllers run on several interfaces here: {', '.join(names)}",
                           fix="say which with --iface (or FASTLB_IFACE)")
    return names[0], folder / f"{names[0]}.sock"


def call(request: dict, ifname: str | None = None, timeout: float = TIMEOUT) -> dict:
    """Send ``request`` to the controller and return its reply; ControlError on a refusal."""
    ifname, path = find(ifname)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except PermissionError as exc:
            raise ControlError(f"permission denied on the control socket {path} (root only, mode 0600)",
                               fix="run it as root: sudo fastlb ...") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoController(f"no fastlb controller answers on {ifname} ({path}: {os_error(exc)})",
                               fix=f"start it: fastlb attach {ifname} -c CONFIG (or systemctl start "
                                   f"fastlb@{ifname}); the data plane keeps forwarding meanwhile") from exc
        try:
            s.sendall(json.dumps(request).encode() + b"\n")
            raw = _read_line(s)
        except OSError as exc:
            raise ControlError(f"the controller on {ifname} did not answer: {os_error(exc)}",
                               fix="see its log (journalctl -u fastlb@IFACE)") from exc
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"the controller on {ifname} sent a malformed reply: {raw[:80]!r}",
                           fix="see its log (journalctl -u fastlb@IFACE)") from exc
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"), fix=reply.get("fix"))
    return reply
