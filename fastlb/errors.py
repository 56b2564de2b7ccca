"""One error hierarchy for fastlb.

Every error the CLI can show is a FastlbError: one line that names the object,
what went wrong (with the errno when there is one) and what to do instead.
Chain the cause with ``raise ... from exc``.
"""

from __future__ import annotations

import errno as _errno
import os


class FastlbError(Exception):
    """Base class: ``str(err)`` is the single line the CLI prints."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.fix}" if self.fix else self.message


class ConfigError(FastlbError):
    """The config file is missing, unreadable or invalid.

    ``field`` is the dotted path of the offending key (``vip[1].backend[0].address``),
    ``line`` its 1-based line in the file when known.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None,
                 line: int | None = None, fix: str | None = None):
        self.path = path
        self.field = field
        self.line = line
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        elif line:
            where = f"line {line}: "
        if field:
            where += f"{field}: "
        super().__init__(where + message, fix=fix)


class PrivilegeError(FastlbError):
    """The operation needs root (CAP_NET_ADMIN and CAP_BPF)."""


class InterfaceError(FastlbError):
    """A network interface is missing or unusable."""


class AttachError(FastlbError):
    """Attaching or detaching the XDP program failed."""


class BpfError(FastlbError):
    """A bpf() call or a BCC compile/load failed."""


class ToolchainError(FastlbError):
    """BCC or the kernel headers are missing."""


class NeighbourError(FastlbError):
    """A backend's MAC address could not be resolved."""


def require_root(command: str, needs: str = "CAP_BPF and CAP_NET_ADMIN") -> None:
    """Refuse ``fastlb COMMAND`` (e.g. ``"attach"``, ``"lab up"``) unless run as root."""
    if os.geteuid() != 0:
        raise PrivilegeError(f"{command} needs root ({needs})", fix=f"run it as root: sudo fastlb {command}")


def os_error(exc: OSError) -> str:
    """Render an OSError as ``ENOENT (No such file or directory)``."""
    code = exc.errno or 0
    name = _errno.errorcode.get(code, str(code))
    return f"{name} ({os.strerror(code)})" if code else str(exc)
