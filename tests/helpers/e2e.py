"""Running the real ``fastlb`` CLI in a namespace lab: the e2e tests' shared helpers."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess

from fastlb.lab.topology import Lab, python_argv, python_env

CONNECTIONS = 300


def fastlb_argv(*args) -> list[str]:
    return python_argv("fastlb.cli", *args)


def run_fastlb(lab: Lab, role: str, *args, timeout: float = 60.0, check: bool = False):
    return lab.run(role, fastlb_argv(*args), timeout=timeout, check=check, env=python_env())


class Attached:
    """`fastlb attach` running in the foreground in the LB namespace."""

    def __init__(self, lab: Lab, config_path, *extra):
        self.lab = lab
        self.proc = lab.exec("lb", fastlb_argv("attach", lab.lb_iface, "-c", str(config_path), *extra),
                             env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "attached to" not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"fastlb attach failed: {line} {err}")
        self.banner = line

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


@contextlib.contextmanager
def attached(lab: Lab, folder, text: str, *extra, name: str = "fastlb.toml"):
    """`fastlb attach` with config ``text`` (written to ``folder/name``) for the
    length of the block; it must detach cleanly at the end."""
    path = folder / name
    path.write_text(text)
    att = Attached(lab, path, *extra)
    try:
        yield path
    finally:
        code, _, err = att.stop()
        assert code == 0, err


def lb_xdp_prog_id(lab: Lab, ifname: str = "eth0", role: str = "lb") -> int:
    with lab.ipr(role) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


def status(lab: Lab) -> list[dict]:
    res = run_fastlb(lab, "lb", "status", "--json", check=True)
    return json.loads(res.stdout)


def scrape(lab) -> dict[tuple, float]:
    """The Prometheus endpoint's samples: {(name, frozenset of label pairs): value}."""
    res = lab.run("lb", ["curl", "-sf", "http://127.0.0.1:9469/metrics"])
    out = {}
    for line in res.stdout.splitlines():
        m = re.fullmatch(r'(fastlb_\w+)(?:\{(.*)\})? (\S+)', line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples, name, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]
