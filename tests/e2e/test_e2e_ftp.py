"""FTP through a DSR VIP: stock vsftpd on three backends, stock curl in passive mode.

The VIP lists FTP's control port and the servers' passive range
(``ports = [21, "30000-30100"]``) with ``persistence``, so that each client's
data connections reach the backend that holds its control connection.
Twenty clients (twenty addresses of the client namespace) each fetch one
file. Each backend announces itself in its banner (``220 fastlb-bN``) and
serves files whose content is its name, so a session whose data came from
another backend than its control connection would show it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from fastlb.lab.topology import Lab
from helpers.controller import Controller, fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

SOURCES = [f"198.18.0.{200 + i}" for i in range(20)]
VSFTPD_CONF = """listen=YES
background=NO
anonymous_enable=YES
no_anon_password=YES
local_enable=NO
write_enable=NO
anon_root={root}
ftpd_banner=fastlb-{name}
pasv_enable=YES
pasv_address={vip}
pasv_addr_resolve=NO
pasv_min_port=30000
pasv_max_port=30100
isolate=NO
isolate_network=NO
seccomp_sandbox=NO
secure_chroot_dir={empty}
xferlog_enable=YES
vsftpd_log_file={log}
"""


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3, ipv6=False) as lab:
        for src in SOURCES:
            subprocess.run(["ip", "-n", lab.ns("client"), "addr", "add", f"{src}/24", "dev", "eth0"], check=True)
        yield lab


@pytest.fixture
def ftp_servers(lab):
    top = Path(tempfile.mkdtemp(prefix="fastlb-ftp-"))
    top.chmod(0o755)
    procs = []
    try:
        for b in lab.backend_names:
            root, empty = top / b / "pub", top / b / "empty"
            root.mkdir(parents=True)
            empty.mkdir()
            for p in (top / b, root, empty):
                p.chmod(0o755)
            for i in range(len(SOURCES)):
                (root / f"file{i}.txt").write_text(f"{b}\n")
            conf = top / b / "vsftpd.conf"
            conf.write_text(VSFTPD_CONF.format(root=root, name=b, vip=lab.vip4, empty=empty,
                                               log=top / b / "vsftpd.log"))
            procs.append(lab.exec(b, ["vsftpd", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        yield top
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        shutil.rmtree(top, ignore_errors=True)


def config(lab) -> str:
    lines = ["[[vip]]", f'address = "{lab.vip4}"', 'ports = [21, "30000-30100"]', 'algorithm = "rr"',
             "persistence = 600", "[vip.health]", 'kind = "tcp"', "port = 21", "interval = 0.5", "timeout = 0.5"]
    for b in lab.backend_names:
        lines += ["[[vip.backend]]", f'address = "{lab.addr(b)}"']
    return "\n".join(lines) + "\n"


def fetch(lab, src: str, i: int) -> tuple[str | None, str, str]:
    """(banner's backend, file content, curl's error) of one passive-mode session from ``src``."""
    res = lab.run("client", ["curl", "-sS", "-v", "--ftp-pasv", "--interface", src, "--max-time", "10",
                             f"ftp://{lab.vip4}/file{i}.txt"], check=False, timeout=30)
    banner = re.search(r"< 220 fastlb-(b\d)", res.stderr)
    return (banner.group(1) if banner else None), res.stdout.strip(), \
        "" if res.returncode == 0 else res.stderr.strip()[-300:]


def test_curl_fetches_20_files_through_the_vip_each_session_on_one_backend(lab, ftp_servers, tmp_path):
    path = tmp_path / "fastlb.toml"
    path.write_text(config(lab))
    ctl = Controller(lab, path)
    try:
        results = [fetch(lab, src, i) for i, src in enumerate(SOURCES)]
        bound = fastlb(lab, "flows", "list", "--persistent").stdout
    finally:
        ctl.stop()
        fastlb(lab, "detach", lab.lb_iface, check=False)
    failed = [(SOURCES[i], err) for i, (_, _, err) in enumerate(results) if err]
    split = [(SOURCES[i], ctrl, data) for i, (ctrl, data, err) in enumerate(results) if not err and ctrl != data]
    served = Counter(data for _, data, err in results if not err)
    print(f"\nFTP: {len(SOURCES) - len(failed)} of {len(SOURCES)} sessions fetched their file; "
          f"{len(split)} had data from another backend than their control connection; served {dict(served)}")
    assert not failed, failed
    assert not split, split
    assert set(served) == set(lab.backend_names)
    assert bound.strip().endswith(f"{len(SOURCES)} binding(s)")
