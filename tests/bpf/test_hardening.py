"""Control surfaces, each door tried on its own.

- The control socket checks the peer's uid (SO_PEERCRED) even when its mode
  would let anyone in: here the test opens it to 0666 on purpose and
  connects as `nobody`.
- Garbage on the control socket gets one clear refusal, not a crash.
- Metrics listen on localhost unless told otherwise.
- Commands do not follow a symlink out of fastlb's run or pin folders.
- Detach touches only fastlb's own pins; attach never replaces a program it
  did not attach (tests/e2e/test_e2e.py tries that one with a real program).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fastlb.cli import main
from fastlb.controller import control_socket
from fastlb.errors import BpfError
from fastlb.kernel import pins

pytestmark = pytest.mark.root

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def ctl_root(monkeypatch):
    """A control-socket folder that `nobody` can reach (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    top = tempfile.mkdtemp(prefix="fastlb-ctl-")
    os.chmod(top, 0o755)
    monkeypatch.setenv("FASTLB_CTL_ROOT", os.path.join(top, "ctl"))
    yield os.path.join(top, "ctl")
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def server(ctl_root):
    srv = control_socket.Server("eth9", lambda request: {"echo": request.get("cmd")})
    srv.start()
    yield srv
    srv.close()


def test_a_world_writable_socket_still_refuses_another_uid(server, ctl_root):
    path = control_socket.socket_path("eth9")
    os.chmod(path.parent.parent, 0o755)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)  # deliberately open: only SO_PEERCRED stands in the way now
    # The server answers a foreign uid at once and closes, so the client only listens.
    client = ("import os, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(os.environ['P']); "
              "s.settimeout(5); sys.stdout.write(s.recv(4096).decode())")
    res = subprocess.run([*NOBODY, sys.executable, "-c", client], env=dict(os.environ, P=str(path)),
                         capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr  # the mode let it connect ...
    reply = json.loads(res.stdout)
    assert reply["ok"] is False and "uid 65534 may not use the control socket" in reply["error"]
    assert control_socket.call({"cmd": "hello"}, "eth9")["echo"] == "hello"  # ... and root still gets through


@pytest.mark.parametrize("garbage", [b"\n", b"not json\n", b"[1, 2]\n", b'{"no": "cmd"}\n', b"\xff\xfe\n"])
def test_garbage_on_the_socket_gets_a_clear_refusal(server, garbage):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(control_socket.socket_path("eth9")))
    s.sendall(garbage)
    reply = json.loads(s.recv(65536).decode())
    s.close()
    assert reply["ok"] is False and reply["error"]
    assert control_socket.call({"cmd": "hello"}, "eth9")["echo"] == "hello"  # the server lives on


def test_metrics_listen_on_localhost_by_default():
    attach = next(c for c in main.commands.values() if c.name == "attach")
    metrics = next(p for p in attach.params if p.name == "metrics_listen")
    assert metrics.default.startswith("127.0.0.1:")


def test_detach_does_not_follow_a_symlinked_pin_folder(tmp_path):
    base = pins.ensure_bpffs()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    link = pins.attachment_dir("lnk0", base)
    made_parent = not link.parent.exists()
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(victim, link)
    except OSError as exc:  # bpffs refuses symlinks to other filesystems on some kernels
        pytest.skip(f"bpffs refused the symlink: {exc}")
    try:
        with pytest.raises(BpfError, match="symlink"):
            pins.remove_dir(link)
        res = CliRunner().invoke(main, ["detach", "lnk0"])
        assert res.exit_code != 0
        assert (victim / "precious").read_text() == "keep me"
    finally:
        os.unlink(link)
        if made_parent:
            link.parent.rmdir()


def test_detach_of_an_interface_fastlb_never_attached_touches_nothing():
    before = sorted(p.name for p in pins.ensure_bpffs().iterdir())
    res = CliRunner().invoke(main, ["detach", "never0"])
    assert res.exit_code != 0 and "not attached" in res.output
    assert sorted(p.name for p in pins.ensure_bpffs().iterdir()) == before
