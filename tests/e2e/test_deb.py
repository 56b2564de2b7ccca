"""The Debian package (make deb): what it installs, what it depends on, and
that lintian finds no error. Builds dist/fastlb_*.deb with scripts/build-deb.sh
(about 90 s) unless one newer than every source file is there. make vm-test
installs and runs it in a Debian 12 VM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]  # builds the .deb (30-40 s): make test-slow

TOP = Path(__file__).resolve().parents[2]
REQUIRED = [
    "./usr/bin/fastlb",
    "./lib/systemd/system/fastlb@.service",
    "./usr/lib/tmpfiles.d/fastlb.conf",
    "./etc/fastlb/fastlb.toml.example",
    "./usr/share/man/man1/fastlb.1.gz",
    "./usr/share/man/man1/fastlb-attach.1.gz",
    "./usr/share/man/man1/fastlb-detach.1.gz",
    "./usr/share/bash-completion/completions/fastlb",
    "./usr/lib/python3/dist-packages/fastlb/bpf/fastlb_kern.c",
    "./usr/lib/python3/dist-packages/fastlb/bpf/fastlb_consts.h",
    "./usr/libexec/fastlb/kernel-headers",
    "./usr/libexec/fastlb/remove-attachments",
    "./usr/share/doc/fastlb/README.md.gz",
    "./usr/share/doc/fastlb/grafana/fastlb.json",
]


def _sources_mtime() -> float:
    tracked = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z"], capture_output=True, check=True).stdout
    paths = [TOP / p.decode() for p in tracked.split(b"\0") if p]
    return max(p.stat().st_mtime for p in paths if p.exists())


@pytest.fixture(scope="module")
def deb() -> Path:
    debs = sorted((TOP / "dist").glob("fastlb_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs or debs[-1].stat().st_mtime < _sources_mtime():
        res = subprocess.run([str(TOP / "scripts" / "build-deb.sh")], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        debs = sorted((TOP / "dist").glob("fastlb_*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1]


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout


def test_the_package_holds_the_command_unit_tmpfiles_man_pages_completion_bpf_and_docs(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5] for line in listing.splitlines()}
    missing = [p for p in REQUIRED if p not in paths]
    assert not missing, f"{deb.name} lacks {missing}"
    assert any(p.startswith("./usr/lib/python3/dist-packages/fastlb/core/_core.cpython-") for p in paths)


def test_the_packaged_unit_and_tmpfiles_say_what_fastlb_needs(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    unit = (tmp_path / "lib/systemd/system/fastlb@.service").read_text()
    assert "ExecStart=/usr/bin/fastlb attach %i" in unit and "/usr/local" not in unit
    assert "TimeoutStartSec=10min" in unit  # BCC's compile at start outlasts systemd's 90 s on slow boxes
    tmpfiles = (tmp_path / "usr/lib/tmpfiles.d/fastlb.conf").read_text()
    assert "d /run/fastlb " in tmpfiles and "d /run/fastlb-bird " in tmpfiles
    completion = (tmp_path / "usr/share/bash-completion/completions/fastlb").read_text()
    assert "_FASTLB_COMPLETE=bash_complete" in completion


def test_dependencies_come_from_debian_and_the_lab_only_suggests(deb):
    depends = field(deb, "Depends")
    for pkg in ("python3-bpfcc", "python3-pyroute2", "python3-click", "python3-prometheus-client", "iproute2",
                "libbpf1"):
        assert pkg in depends, depends
    suggests = field(deb, "Suggests")
    for pkg in ("python3-scapy", "python3-rich", "python3-matplotlib"):
        assert pkg in suggests and pkg not in depends, (depends, suggests)


def test_lintian_finds_no_error(deb):
    res = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)], capture_output=True, text=True,
                         timeout=600)
    errors = [line for line in res.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)
