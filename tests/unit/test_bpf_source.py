"""Rules for the BPF C that only an older kernel's verifier would catch (no root, no compile).

The host's kernel is newer than the one fastlb ships to: Debian 12's 6.1
verifier keeps no bounds for a byte swap's result (BPF_END marks the register
unknown), so ``pkt + bpf_ntohs(iph->tot_len)`` loads here and is refused
there ("math between pkt pointer and register with unbounded min value").
tests/bpf cannot see it; the gate is ``sudo make vm-test``, which loads the
program in a 6.1 guest. This check catches the known pattern early: a 16-bit
field in host order comes from ``fl_ntohs()`` (bpf/parsing_helpers.h), which
gives the verifier [0, 0xffff], never from a bare ``bpf_ntohs()``.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BARE_SWAP = re.compile(r"\b(bpf_ntohs|bpf_be16_to_cpu|__builtin_bswap16|be16toh|ntohs)\s*\(")
HELPER = re.compile(r"static __always_inline __u32 fl_ntohs\([^)]*\)\s*\{.*?\n\}", re.S)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def bare_swaps(text: str) -> list[int]:
    """Line numbers of 16-bit byte swaps outside fl_ntohs() itself."""
    code = strip_comments(text)
    code = HELPER.sub(lambda m: "\n" * m.group(0).count("\n"), code)
    return [code.count("\n", 0, m.start()) + 1 for m in BARE_SWAP.finditer(code)]


def test_sixteen_bit_fields_come_through_fl_ntohs():
    found = {p.name: bare_swaps(p.read_text()) for p in sorted((REPO / "bpf").glob("*.[ch]"))}
    found = {name: lines for name, lines in found.items() if lines}
    assert not found, (
        f"bare bpf_ntohs() in bpf/ {found}: use fl_ntohs() (bpf/parsing_helpers.h); "
        "the 6.1 verifier refuses packet arithmetic with a byte swap's result")


def test_the_rule_sees_a_bare_swap_and_not_the_helper():
    helper = (REPO / "bpf" / "parsing_helpers.h").read_text()
    assert "fl_ntohs" in helper and bare_swaps(helper) == []
    bad = helper + "\n/* bpf_ntohs( in a comment */\nstatic int f(struct iphdr *iph)\n{\n\treturn bpf_ntohs(iph->tot_len);\n}\n"
    assert bare_swaps(bad) == [helper.count("\n") + 5]


CTX_BOUND = re.compile(r"\bctx->data(_end)?\b")
LAB_PROGRAMS = ("lab_", "xdp_macswap", "xdp_pass")   # the lab's own programs


def test_the_frame_bounds_come_through_fl_data():
    """fastlb's programs read ctx->data and ctx->data_end only through fl_data() and
    fl_data_end(): the merged conntrack and 6.1 work once made clang keep &ctx->data_end
    in a spilled register, which every verifier refuses ("dereference of modified ctx ptr")."""
    found = {}
    for p in sorted((REPO / "bpf").glob("*.[ch]")):
        if p.name.startswith(LAB_PROGRAMS):
            continue
        code = strip_comments(p.read_text())
        lines = [code.count("\n", 0, m.start()) + 1 for m in CTX_BOUND.finditer(code)]
        if lines:
            found[p.name] = lines
    assert not found, f"ctx->data/ctx->data_end read directly in bpf/ {found}: use fl_data()/fl_data_end()"
