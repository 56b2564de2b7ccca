"""fastlb's benchmarks: one runner, `sudo make bench`, writing docs/BENCHMARKS.md.

Each section is a module in bench/ with ``run(quick: bool) -> str`` (Markdown).
Every figure is measured side by side with its baseline or peer in the same
run, because these machines are noisy: read ratios, not absolute numbers.

    sudo make bench                          # all sections -> docs/BENCHMARKS.md
    sudo .venv/bin/python bench/run.py --quick --out /tmp/b.md   # the smoke run the tests use
    sudo .venv/bin/python bench/run.py --only packets
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

# (name, module, needs root)
SECTIONS = [
    ("packets", "bench_packets", True),
    ("core", "bench_core", False),
    ("rate", "bench_rate", True),
    ("tcp", "bench_tcp", True),
    ("floor", "bench_floor", True),
    ("l7", "bench_l7", True),
    ("control", "bench_control", True),
    ("controller", "bench_controller", True),
    ("scale", "bench_scale", True),
    ("health", "bench_health", True),
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import bcc  # noqa: F401
        bcc_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"],
                                     capture_output=True, text=True).stdout or "?"
    except ImportError:
        bcc_version = "not installed"
    return "\n".join([
        "| | |", "|---|---|",
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
        f"| kernel | {platform.release()} |",
        f"| CPU | {cpu}, {os.cpu_count()} CPUs |",
        f"| Python | {platform.python_version()} |",
        f"| BCC | {bcc_version} |",
    ])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _sections(text: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(head, {"## title": lines}, tail) of a BENCHMARKS.md: the "Total" line is the tail."""
    head, blocks, tail, current = [], {}, [], None
    for line in text.splitlines():
        if line.startswith("Total: "):
            tail.append(line)
        elif line.startswith("## "):
            current = line
            blocks[current] = [line]
        elif current is None:
            head.append(line)
        else:
            blocks[current].append(line)
    return head, blocks, tail


def merge(old: str, new: str, command: str) -> str:
    """``old`` with the sections of ``new`` in place of (or after) its own; the machine is the new run's."""
    head, blocks, _ = _sections(old)
    _, fresh, _ = _sections(new)
    for title, lines in fresh.items():
        blocks[title] = lines
    head = [line for line in head if not line.startswith("Command: ")]
    while len(head) > 1 and head[-1] == head[-2] == "":
        head.pop()
    note = f"Command: sections {', '.join(t[3:] for t in fresh if t != '## Machine')} by `{command}`; the others " \
           "by an earlier run (each section says its own method)."
    out = head + [note, ""] + [line for lines in blocks.values() for line in lines]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny durations: a smoke run (figures meaningless)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="Markdown file to write")
    ap.add_argument("--only", action="append", choices=[s[0] for s in SECTIONS], help="run only these sections")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace (or add) only these sections in --out, keeping the others")
    args = ap.parse_args(argv)

    command = "sudo make bench" if not args.quick and not args.only else \
        "sudo .venv/bin/python bench/run.py " + " ".join(a for a in (argv or sys.argv[1:]))
    parts = ["# fastlb benchmarks", "",
             "Written by `bench/run.py`; every figure is measured next to its baseline or peer in the same run.",
             "", f"Command: `{command}`", "", "## Machine", "", machine(), ""]
    started = time.monotonic()
    for name, module, needs_root in SECTIONS:
        if args.only and name not in args.only:
            continue
        if needs_root and os.geteuid() != 0:
            print(f"bench: skipping {name}: needs root", file=sys.stderr)
            continue
        t0, load0 = time.monotonic(), load_average()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        section = importlib.import_module(module).run(quick=args.quick)
        parts += [section.rstrip(), "", f"*(section took {time.monotonic() - t0:.0f} s; load average "
                  f"{load0} before, {load_average()} after: the machine's other work)*", ""]
    parts.append(f"Total: {time.monotonic() - started:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(parts) + "\n"
    if args.merge and args.only and out.exists():
        text = merge(out.read_text(), text, command)
    out.write_text(text)
    print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
