"""fastlb.controller.bgp: what is announced, the include BIRD reads, and a real BIRD taking it.

``bird -p`` parses the include first (tests/unit/test_bgp.py checks its
text and the plan without BIRD). The others start a real BIRD inside a
namespace of their own (fastlb.lab.bird), with its control socket in the
run's folder, and drive it through the Announcer as the controller does.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from fastlb.config import parse_config
from fastlb.controller import bgp
from fastlb.lab import bird as labbird
from fastlb.lab import netns
from helpers.bgp import VIPS, bgp_table

CONFIG = parse_config(VIPS + bgp_table())
ALL = {v.name for v in CONFIG.vips}


def test_bird_parses_the_include(tmp_path):
    if not labbird.available():
        pytest.fail("BIRD is not installed: sudo make setup installs bird2")
    cfg = parse_config(VIPS + bgp_table(extra="bfd = true\nbfd_interval = 0.05\nhold_time = 3"))
    (tmp_path / "fastlb.d").mkdir()
    include = tmp_path / "fastlb.d" / "eth0.conf"
    include.write_text(bgp.render(cfg.bgp, "eth0", ["198.19.0.100/32", "2001:db8:ffff::100/128"]))
    main = tmp_path / "bird.conf"
    main.write_text(f'router id 198.18.0.2;\ninclude "{tmp_path}/fastlb.d/*.conf";\n')
    res = subprocess.run(["bird", "-p", "-c", str(main)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    include.write_text(include.read_text() + "protocol nonsense {}\n")
    assert subprocess.run(["bird", "-p", "-c", str(main)], capture_output=True).returncode != 0


# ---- a real BIRD ------------------------------------------------------------------------------------


@contextlib.contextmanager
def bird_box():
    """A namespace of this run with lo up, and a BIRD (not started) whose files are in the run's folder."""
    if not labbird.available():
        pytest.fail("BIRD is not installed: sudo make setup installs bird2")
    runid = netns.new_runid()
    name = netns.ns_name(runid, "bird")
    run_dir = netns.run_dir_of(runid)
    st = netns.new_state(runid, [name], run_dir=run_dir)
    st.save(exclusive=True)
    try:
        run_dir.mkdir(mode=0o755)
        netns.create(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield labbird.Bird(name, run_dir, "box")
    finally:
        netns.remove_lab(st)


@pytest.fixture
def bird(monkeypatch, tmp_path):
    """A BIRD in a namespace of its own, its files in the run's folder; our state files in tmp_path."""
    monkeypatch.setenv("FASTLB_STATE_ROOT", str(tmp_path / "state"))
    with bird_box() as b:
        (b.run_dir / "fastlb.d").mkdir()
        b.start(f'router id 198.18.0.2;\nprotocol device {{ }}\ninclude "{b.run_dir}/fastlb.d/*.conf";\n')
        yield b


def config_for(b: labbird.Bird, extra: str = ""):
    return parse_config(VIPS + bgp_table(include=f"{b.run_dir}/fastlb.d/eth0.conf", socket=str(b.socket),
                                         extra=extra))


class Log:
    def __init__(self):
        self.lines: list[tuple[str, dict]] = []

    def __call__(self, event, **fields):
        self.lines.append((event, fields))

    def events(self, name):
        return [f for e, f in self.lines if e == name]


def routes_in(b: labbird.Bird) -> set[str]:
    return bgp.Birdc(str(b.socket)).table_routes("fastlb_eth0_4") | bgp.Birdc(str(b.socket)).table_routes(
        "fastlb_eth0_6")


@pytest.mark.root
def test_announce_withdraw_and_a_restart_that_changes_nothing(bird):
    cfg, log = config_for(bird), Log()
    ann = bgp.Announcer("eth0", log, attached=lambda: True)
    ann.update(cfg, ALL)
    assert routes_in(bird) == {"198.19.0.100/32", "198.19.0.101/32", "2001:db8:ffff::100/128"}
    assert len(log.events("route_announced")) == 3 and not log.events("bgp_speaker_error")
    peer = bgp.Birdc(str(bird.socket)).protocol("fastlb_eth0_peer0")
    assert peer["proto"] == "BGP" and peer["neighbor"] == "198.18.0.254"
    assert peer["bgp_state"] in ("Active", "Connect", "Idle")      # nobody answers at 198.18.0.254

    ann.update(cfg, ALL - {"198.19.0.101:80/tcp"})
    assert routes_in(bird) == {"198.19.0.100/32", "2001:db8:ffff::100/128"}
    (gone,) = log.events("route_withdrawn")
    assert gone == {"route": "198.19.0.101/32", "vips": "198.19.0.101:80/tcp", "why": "no healthy backend"}

    # A controller that died and came back: same health, same file, nothing said or changed.
    include = bird.run_dir / "fastlb.d" / "eth0.conf"
    mtime = include.stat().st_mtime_ns
    log2 = Log()
    again = bgp.Announcer("eth0", log2, attached=lambda: True)
    again.update(cfg, ALL - {"198.19.0.101:80/tcp"})
    assert include.stat().st_mtime_ns == mtime
    assert not log2.events("route_announced") and not log2.events("route_withdrawn")
    assert routes_in(bird) == {"198.19.0.100/32", "2001:db8:ffff::100/128"}

    st = bgp.status("eth0")
    assert st["problem"] is None and st["routes"] == ["198.19.0.100/32", "2001:db8:ffff::100/128"]
    assert st["vips"]["198.19.0.100:80/tcp"]["in_bird"] and st["vips"]["198.19.0.100:80/tcp"]["to_peers"] == 0
    assert st["vips"]["198.19.0.101:80/tcp"]["state"] == bgp.WITHDRAWN
    assert [p["state"] for p in st["peers"]] != ["not in BIRD"] * 2

    # Detach: every route goes, the sessions stay, and the wait is the configured delay.
    delay, note = bgp.withdraw_for_detach("eth0")
    assert delay == cfg.bgp.detach_delay and "withdrew 198.19.0.100/32, 2001:db8:ffff::100/128" in note
    assert routes_in(bird) == set()
    assert bgp.Birdc(str(bird.socket)).protocol("fastlb_eth0_peer0") is not None
    assert bgp.withdraw_for_detach("eth0") == (0.0, None)   # nothing left to withdraw


@pytest.mark.root
def test_a_speaker_that_is_down_is_retried_and_bird_keeps_the_last_file(bird):
    cfg, log = config_for(bird), Log()
    ann = bgp.Announcer("eth0", log, attached=lambda: True)
    ann.update(cfg, ALL)
    config = bird.conf.read_text()
    bird.stop()
    ann.update(cfg, ALL - {"198.19.0.100:80/tcp", "198.19.0.100:9000/udp"})
    ann.retry()
    (err,) = log.events("bgp_speaker_error")   # said once, not at every retry
    assert "cannot reach BIRD" in err["error"] and ann.pending
    bird.start(config)                          # reads the file: the withdrawal is in it already
    assert routes_in(bird) == {"198.19.0.101/32", "2001:db8:ffff::100/128"}
    ann.retry()
    assert not ann.pending and log.events("bgp_speaker_ok")


@pytest.mark.root
def test_a_bird_conf_without_the_include_is_reported(bird):
    log = Log()
    cfg = parse_config(VIPS + bgp_table(include=f"{bird.run_dir}/elsewhere/eth0.conf", socket=str(bird.socket)))
    bgp.Announcer("eth0", log, attached=lambda: True).update(cfg, ALL)
    (err,) = log.events("bgp_speaker_error")
    assert "does not include" in err["error"] and f'include "{bird.run_dir}/elsewhere/*.conf";' in err["error"]


@pytest.mark.root
def test_removing_bgp_from_the_config_removes_fastlbs_protocols(bird):
    log = Log()
    ann = bgp.Announcer("eth0", log, attached=lambda: True)
    ann.update(config_for(bird), ALL)
    assert bgp.Birdc(str(bird.socket)).protocol("fastlb_eth0_peer0") is not None
    ann.update(parse_config(VIPS.replace('announce = "bgp"', 'announce = "none"')), ALL)
    assert bgp.Birdc(str(bird.socket)).protocol("fastlb_eth0_peer0") is None
    assert len(log.events("route_withdrawn")) == 3 and bgp.status("eth0") is None


@pytest.mark.root
def test_an_include_that_cannot_be_written_is_retried(bird):
    log = Log()
    include = bird.run_dir / "fastlb.d" / "eth0.conf"
    include.mkdir()                              # in the way: not a file
    ann = bgp.Announcer("eth0", log, attached=lambda: True)
    ann.update(config_for(bird), ALL)
    (err,) = log.events("bgp_speaker_error")
    assert str(include) in err["error"] and ann.pending and routes_in(bird) == set()
    ann.retry()
    assert len(log.events("bgp_speaker_error")) == 1
    include.rmdir()
    ann.retry()
    assert not ann.pending and log.events("bgp_speaker_ok")
    assert routes_in(bird) == {"198.19.0.100/32", "198.19.0.101/32", "2001:db8:ffff::100/128"}


# ---- after a reboot: the include folder --------------------------------------------------------

TMPFILES = Path(__file__).resolve().parents[2] / "systemd" / "fastlb.tmpfiles"


def test_one_default_include_path_everywhere():
    """The tmpfiles rule, bgp.py's default and every text that names the default agree."""
    top = TMPFILES.parent.parent
    rules = [ln.split() for ln in TMPFILES.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert [r[:2] for r in rules] == [["d", bgp.DEFAULT_INCLUDE_DIR]]
    for doc in ("docs/CONFIG.md", "docs/SCALEOUT.md", "fastlb/config/__init__.py", "fastlb/controller/bgp.py"):
        text = (top / doc).read_text()
        assert "/run/fastlb/bird" not in text, doc
        assert bgp.DEFAULT_INCLUDE_DIR in text, doc
    assert "fastlb.tmpfiles" in (top / "scripts" / "setup.sh").read_text()


@pytest.mark.root
def test_bird_needs_the_include_folder_and_the_shipped_tmpfiles_rule_makes_it():
    """BIRD 2 refuses to start when the folder of its include pattern is missing, as
    it is after a reboot (/run is empty); the tmpfiles.d rule fastlb ships, applied
    as systemd-tmpfiles does at boot (here under --root), creates what it needs."""
    with bird_box() as b:
        root = b.run_dir / "root"        # the booted box's file system, as tmpfiles sees it
        config = f'router id 198.18.0.2;\nprotocol device {{ }}\ninclude "{root}{bgp.DEFAULT_INCLUDE_DIR}/*.conf";\n'
        b.conf.write_text(config)
        # The daemon itself, not only bird -p: it exits at once, naming the pattern.
        res = subprocess.run(netns.exec_argv(b.ns, ["bird", "-f", "-c", str(b.conf), "-s", str(b.socket)]),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and "Unable to match pattern" in res.stderr + res.stdout
        with pytest.raises(netns.LabError, match="pattern"):  # bird -p, as Debian's bird.service runs first
            b.start(config)
        res = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        folder = root / bgp.DEFAULT_INCLUDE_DIR.lstrip("/")
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o755 and not any(folder.iterdir())
        b.start(config)                  # an empty folder: BIRD starts and answers
        assert b.proc.poll() is None
