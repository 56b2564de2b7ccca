"""Writing a file atomically: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str, mode: int | None = None, *,
                 exclusive: bool = False) -> None:
    """Write ``text`` to a temporary file beside ``path``, then move it over ``path``.

    ``mode`` sets the new file's permissions (None: the umask's). With
    ``exclusive``, an existing ``path`` is never replaced: FileExistsError.
    OSError passes to the caller, which names the file's role in its error;
    the temporary file never stays behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)   # EEXIST instead of replacing
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
