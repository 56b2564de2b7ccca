"""The control socket as root: its modes and owner, refusals, a stale socket (no namespace needed)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from fastlb.controller import control_socket
from fastlb.errors import FastlbError

pytestmark = pytest.mark.root


@pytest.fixture
def ctl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLB_CTL_ROOT", str(tmp_path / "ctl"))
    return tmp_path / "ctl"


def test_the_socket_answers_refuses_and_is_root_only(ctl_root):
    def handle(request):
        if request["cmd"] == "boom":
            raise FastlbError("VIP 1.2.3.4:80/tcp is not here", fix="use one of: x")
        return {"echo": request["cmd"]}

    server = control_socket.Server("eth9", handle)
    server.start()
    try:
        path = control_socket.socket_path("eth9")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert control_socket.call({"cmd": "hello"})["echo"] == "hello"
        with pytest.raises(control_socket.ControlError) as info:
            control_socket.call({"cmd": "boom"}, "eth9")
        assert str(info.value) == "VIP 1.2.3.4:80/tcp is not here. Fix: use one of: x"
        with pytest.raises(control_socket.ControlError, match="another fastlb controller is running on eth9"):
            control_socket.Server("eth9", handle)
        nobody = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             "import os, socket; s = socket.socket(socket.AF_UNIX); s.connect(os.environ['P'])"],
            env=dict(os.environ, P=str(path)), capture_output=True, text=True)
        assert nobody.returncode != 0 and "PermissionError" in nobody.stderr
    finally:
        server.close()
    assert not control_socket.socket_path("eth9").exists()
    with pytest.raises(control_socket.NoController):
        control_socket.call({"cmd": "hello"}, "eth9")


def test_a_stale_socket_of_a_killed_controller_is_replaced(ctl_root):
    import socket
    path = control_socket.socket_path("eth9")
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what kill -9 leaves
    with pytest.raises(control_socket.NoController, match="no fastlb controller answers on eth9"):
        control_socket.call({"cmd": "x"})
    server = control_socket.Server("eth9", lambda r: {})
    server.start()
    try:
        assert control_socket.call({"cmd": "x"}) == {"ok": True}
    finally:
        server.close()
