"""fastlb.kernel.cdefs against the C compiler: the header's values as gcc sees them.

Each check compiles a small C program that includes the header and prints
every name cdefs found, so a value the parser gets wrong, or a name it
invents, fails here. ``gcc -dM -E`` lists the header's macros, so a define
the parser misses fails too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from fastlb.errors import FastlbError
from fastlb.kernel import cdefs

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed (apt-get install gcc)")

# Edge cases the real header does not (yet) have; gcc is the referee for these too.
SYNTHETIC = textwrap.dedent("""\
    /* a comment with #define FAKE 1 and enum fake { X }; inside */
    #ifndef SYN_GUARD_H
    #define SYN_GUARD_H
    #ifndef SYN_SIZE
    #define SYN_SIZE 4096   // trailing comment
    #endif
    #define SYN_HEX 0XfF
    #define SYN_OCT 0755
    #define SYN_ZERO 0
    #define SYN_UNSIGNED 10u
    #define SYN_LONG 0x10UL
    #define SYN_EXPR (1 << 3)
    #define SYN_NEG -1
    #define SYN_STR "text"
    #define SYN_FN(x) ((x) + 1)
    #  define SYN_SPACED 7
    enum syn_gap {
        SYN_A,              /* 0 */
        SYN_B = 5,
        SYN_C,              /* 6 */
        SYN_D = 0x20,
        SYN_E,
        SYN_F = SYN_B,      /* an earlier name */
        SYN_G = -3,
        SYN_H,
    };
    enum fl_reason { FL_PASS_X = 0, FL_DROP_Y, FL_REDIRECT_Z, FL_TX_W, FL_REASON_MAX };
    enum { SYN_ANON_0, SYN_ANON_1 = SYN_SIZE };
    #endif
""")

SYNTHETIC_EXPECTED = {
    "SYN_SIZE": 4096, "SYN_HEX": 255, "SYN_OCT": 0o755, "SYN_ZERO": 0, "SYN_UNSIGNED": 10,
    "SYN_LONG": 16, "SYN_SPACED": 7,
    "SYN_A": 0, "SYN_B": 5, "SYN_C": 6, "SYN_D": 32, "SYN_E": 33, "SYN_F": 5, "SYN_G": -3, "SYN_H": -2,
    "FL_PASS_X": 0, "FL_DROP_Y": 1, "FL_REDIRECT_Z": 2, "FL_TX_W": 3, "FL_REASON_MAX": 4,
    "SYN_ANON_0": 0, "SYN_ANON_1": 4096,
}


def c_values(header: Path, names, tmp_path: Path) -> dict[str, int]:
    """Compile a program that includes ``header`` and prints each name's value."""
    lines = "\n".join(f'    printf("%s %lld\\n", "{n}", (long long)({n}));' for n in names)
    src = tmp_path / "print_consts.c"
    src.write_text(f'#include <stdio.h>\n#include "{header.name}"\nint main(void)\n{{\n{lines}\n    return 0;\n}}\n')
    exe = tmp_path / "print_consts"
    cc = subprocess.run([GCC, "-Wall", "-Werror", "-I", str(header.parent), "-o", str(exe), str(src)],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"gcc failed on {src}:\n{cc.stderr}"
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def c_macros(header: Path) -> dict[str, str]:
    """Every object-like macro the header defines, as gcc's preprocessor sees it."""
    out = subprocess.run([GCC, "-dM", "-E", "-x", "c", "-I", str(header.parent), "-"],
                         input=f'#include "{header.name}"\n', check=True, capture_output=True, text=True).stdout
    builtin = subprocess.run([GCC, "-dM", "-E", "-x", "c", "-"], input="", check=True,
                             capture_output=True, text=True).stdout
    macros = {}
    for line in out.splitlines():
        m = re.match(r"#define (\w+) (.*)$", line)
        if m and line not in builtin:
            macros[m.group(1)] = m.group(2).strip()
    return macros


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    d = tmp_path / "bpf"
    d.mkdir()
    (d / cdefs.HEADER).write_text(SYNTHETIC)
    monkeypatch.setenv(cdefs.ENV_BPF_DIR, str(d))
    return d / cdefs.HEADER


@needs_gcc
def test_every_value_matches_the_compiler(tmp_path):
    header = cdefs.bpf_dir() / cdefs.HEADER
    parsed = cdefs.defs()
    assert len(parsed) > 20, "the real header defines dozens of constants"
    assert c_values(header, list(parsed), tmp_path) == dict(parsed)


@needs_gcc
def test_no_integer_define_is_missed():
    header = cdefs.bpf_dir() / cdefs.HEADER
    macros = c_macros(header)
    literal = {n for n, v in macros.items() if cdefs._int_literal(v) is not None}
    names_in_enums = {n for e in cdefs.defs().enum_names() for n in cdefs.enum(e)}
    assert literal == set(cdefs.defs()) - names_in_enums


@needs_gcc
def test_reason_enum_is_dense_and_ordered(tmp_path):
    reasons = cdefs.enum("fl_reason")
    names = list(reasons)
    header = cdefs.bpf_dir() / cdefs.HEADER
    got = c_values(header, names, tmp_path)
    assert [got[n] for n in names] == list(range(len(names))), "per-CPU counters are indexed by reason"
    assert names[-1] == "FL_REASON_MAX"


@needs_gcc
def test_synthetic_header_matches_the_compiler(synthetic, tmp_path):
    parsed = cdefs.load()
    assert parsed.path == synthetic
    assert dict(parsed) == SYNTHETIC_EXPECTED
    assert c_values(synthetic, list(SYNTHETIC_EXPECTED), tmp_path) == SYNTHETIC_EXPECTED
    assert list(parsed.enum("syn_gap")) == ["SYN_A", "SYN_B", "SYN_C", "SYN_D", "SYN_E", "SYN_F", "SYN_G", "SYN_H"]
    assert parsed.enum_names() == ("syn_gap", "fl_reason")


def test_attribute_and_mapping_access():
    assert cdefs.FL_RING_EMPTY == 0xFFFFFFFF
    assert cdefs.FL_ALG_MAGLEV == 0
    assert cdefs.defs()["FL_HASH_SRC"] == cdefs.FL_HASH_SRC == 1
    assert cdefs.defs().FL_P2C_PROBES == cdefs.FL_P2C_PROBES
    with pytest.raises(AttributeError, match="FL_NO_SUCH"):
        cdefs.FL_NO_SUCH
    with pytest.raises(TypeError):
        cdefs.defs()._values["FL_ALG_RR"] = 9     # read-only
    with pytest.raises(TypeError):
        cdefs.enum("fl_algorithm")["FL_ALG_RR"] = 9
    with pytest.raises(KeyError, match="fl_algorithm"):
        cdefs.enum("fl_nope")


def test_enum_order_and_values():
    algs = cdefs.enum("fl_algorithm")
    assert list(algs.items())[:2] == [("FL_ALG_MAGLEV", 0), ("FL_ALG_RR", 1)]
    assert cdefs.enum("fl_hash_mode") == {"FL_HASH_5TUPLE": 0, "FL_HASH_SRC": 1}


def test_parse_is_cached():
    assert cdefs.load() is cdefs.load()
    assert cdefs.defs() is cdefs.load()


def test_reason_verdicts():
    verdicts = cdefs.reason_verdicts()
    assert "FL_REASON_MAX" not in verdicts
    assert set(verdicts.values()) <= {"pass", "drop", "tx", "redirect"}
    assert list(verdicts) == list(cdefs.enum("fl_reason"))[:-1]
    for name, verdict in verdicts.items():
        assert name.startswith(f"FL_{verdict.upper()}_")
    assert cdefs.reason_verdict("FL_TX_DSR") == "tx"
    assert cdefs.reason_verdict("FL_DROP_FRAGMENT") == "drop"
    assert cdefs.reason_verdict("FL_PASS_NOT_IP") == "pass"
    with pytest.raises(ValueError, match="FL_REASON_MAX"):
        cdefs.reason_verdict("FL_REASON_MAX")
    with pytest.raises(ValueError, match="FL_ALG_RR"):
        cdefs.reason_verdict("FL_ALG_RR")


def test_redirect_prefix_and_a_bad_prefix(synthetic):
    assert cdefs.reason_verdict("FL_REDIRECT_Z") == "redirect"
    assert cdefs.reason_verdicts() == {"FL_PASS_X": "pass", "FL_DROP_Y": "drop",
                                       "FL_REDIRECT_Z": "redirect", "FL_TX_W": "tx"}
    bad = cdefs.parse("enum fl_reason { FL_PASS_A, FL_ODD_B, FL_REASON_MAX };")
    with pytest.raises(ValueError, match="FL_ODD_B.*FL_PASS_"):
        bad.reason_verdict("FL_ODD_B")


def test_missing_header_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(cdefs.ENV_BPF_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(FastlbError, match="FASTLB_BPF_DIR") as err:
        cdefs.load()
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_unreadable_enum_value_is_an_error():
    with pytest.raises(FastlbError, match=r"SYN_Y = 'SYN_X \| 4'"):
        cdefs.parse("enum e { SYN_X = 1, SYN_Y = SYN_X | 4, SYN_Z };")


def test_conflicting_redefinition_is_an_error():
    with pytest.raises(FastlbError, match="SYN_X is defined twice"):
        cdefs.parse("#define SYN_X 1\n#define SYN_X 2\n")
    assert cdefs.parse("#define SYN_X 1\n#define SYN_X 1\n")["SYN_X"] == 1


def test_the_c_verdict_function_lists_every_pass_reason():
    """fastlb_verdict.h names the XDP_PASS reasons one by one; they must be exactly the FL_PASS_ ones."""
    import re
    text = (cdefs.bpf_dir() / "fastlb_verdict.h").read_text()
    listed = set(re.findall(r"reason == (FL_PASS_\w+)", text))
    assert listed == {n for n, v in cdefs.reason_verdicts().items() if v == "pass"}
