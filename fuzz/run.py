"""The long data-plane fuzz run: ``make fuzz`` (needs root).

Loads the XDP program unattached (fastlb.testing.testbed), writes the fuzzer's config
(tests/helpers/fuzz_gen.py) to its maps, and feeds it every truncation of well-formed
frames, then N seeded random and mutated frames, judging each one against the
model of docs/DATAPLANE.md (tests/helpers/oracle.py). The frames arrive on a veth
of this run (MTU tests/helpers/fuzz_gen.MTU), so that the tunnel's MTU check
measures against a real device. Prints packets fuzzed, and per mode (DSR,
tunnel, NAT, NAT replies, ARP/ND, ICMP, other) the frames, disagreements
with the oracle and mis-forwards, then the per-reason counts and the rate;
the first disagreements come with the seed, the frame's hex and a scapy
dissection. Exits 1 on any disagreement.

Examples:
    .venv/bin/python fuzz/run.py --packets 1000000
    .venv/bin/python fuzz/run.py --packets 200000 --seed 42 --report /tmp/fuzz.txt
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import fuzz_gen, oracle  # noqa: E402  (the tests' shared helpers)

CHUNK = 100_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("Examples:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000, metavar="N",
                    help="random and mutated frames to feed, after the truncation sweep (default 1000000)")
    ap.add_argument("--seed", type=int, default=None, metavar="S",
                    help="seed of the generator (default: a random one, printed)")
    ap.add_argument("--failures", type=int, default=5, metavar="K",
                    help="disagreements to print in full (default 5)")
    ap.add_argument("--report", type=Path, metavar="FILE", help="also write the figures to FILE")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.packets < 0:
        ap.error("--packets must be 0 or more")
    if os.geteuid() != 0:
        print("fuzz/run.py: needs root (bpf(), BPF_PROG_TEST_RUN): run sudo make fuzz", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    # A timeout's SIGTERM or a closed terminal's SIGHUP unwinds the with-block below,
    # so that the run's veth and scratch pins go as they do after ^C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    from fastlb.kernel.layout import Sizes
    from fastlb.testing.testbed import LB_MAC, Testbed, fake_mac

    s = fuzz_gen.CONFIG_SETTINGS
    sizes = Sizes(max_vips=s["max_vips"], max_backends=s["max_backends"], ring_size=s["ring_size"],
                  conntrack_size=s["conntrack_size"])
    print(f"fuzz: seed {seed}, {args.packets:,} frames after the truncation sweep", flush=True)
    with Testbed(sizes, name=f"fuzz-run-{os.getpid()}") as bed, oracle.TestDevice(fuzz_gen.MTU) as device:
        bed.apply(fuzz_gen.config_text())
        model = oracle.Oracle(fuzz_gen.oracle_vips(fake_mac), fuzz_gen.oracle_settings(LB_MAC))
        campaign = oracle.Campaign(bed, model, seed, args.failures, ifindex=device.ifindex)
        campaign.feed(fuzz_gen.truncation_sweep())
        gen = fuzz_gen.Generator(seed)
        left = args.packets
        while left > 0:
            rep = campaign.feed(gen.frames(min(CHUNK, left)))
            left -= min(CHUNK, left)
            if not args.quiet:
                print(f"  {rep.packets:>10,} frames, {rep.disagreements} disagreements, "
                      f"{rep.rate:,.0f} frames/s", flush=True)
        campaign.check_active()
        rep = campaign.report
    text = rep.summary()
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 1 if rep.disagreements or rep.misforwards or rep.active_problems else 0


if __name__ == "__main__":
    sys.exit(main())
