"""The C structs and maps against their Python twins, field by field.

BCC generates ctypes classes from bpf/fastlb_structs.h when it compiles the
program; fastlb/kernel/structs.py and fastlb/program.MAP_SPECS must match them.
"""

from __future__ import annotations

import ctypes

import pytest

from fastlb.kernel import structs
from fastlb.kernel.layout import MAP_SPECS

pytestmark = pytest.mark.root


def layout(ctype) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every field, padding fields skipped."""
    out = []
    for field in ctype._fields_:
        name = field[0]
        if name.startswith("__pad") or name == "pad":
            continue
        desc = getattr(ctype, name)
        out.append((name, desc.offset, desc.size))
    return out


@pytest.fixture(scope="module")
def decap_program():
    """The backends' decap program, for the structs only its maps use."""
    import uuid

    from fastlb.kernel import pins
    from fastlb.kernel.layout import DECAP_MAP_SPECS, Sizes
    from fastlb.kernel.loader import Program
    pin_dir = pins.ensure_bpffs() / f"scratch-decap-{uuid.uuid4().hex[:6]}"
    prog = Program(pin_dir, Sizes(), source="fastlb_decap.c", function="xdp_fastlb_decap",
                   specs=DECAP_MAP_SPECS).load()
    try:
        yield prog
    finally:
        prog.close()
        pins.remove_dir(pin_dir)


def bcc_types(*programs):
    """C struct name -> the ctypes class BCC generated for it, found through the maps."""
    found = {}
    for program, spec in ((p, s) for p in programs for s in p.specs):
        table = program.bpf[spec.name.encode()]
        for ctype in (table.Key, table.Leaf):
            found[ctype.__name__] = ctype
            elem = getattr(ctype, "_type_", None)  # per-CPU leaves are arrays of the struct
            if isinstance(elem, type) and issubclass(elem, ctypes.Structure):
                found[elem.__name__] = elem
    return found


@pytest.mark.parametrize("c_name", sorted(structs.C_STRUCTS))
def test_struct_matches_bcc(loaded, decap_program, c_name):
    generated = bcc_types(loaded.program, decap_program)
    assert c_name in generated, f"struct {c_name} is not used by any map"
    ours, theirs = structs.C_STRUCTS[c_name], generated[c_name]
    assert ctypes.sizeof(ours) == ctypes.sizeof(theirs)
    assert layout(ours) == layout(theirs)


@pytest.mark.parametrize("spec", MAP_SPECS, ids=[s.name for s in MAP_SPECS])
def test_map_spec_matches_loaded_map(loaded, spec):
    info = loaded.maps.info(spec.name)
    assert info.type_name == spec.type
    assert info.key_size == ctypes.sizeof(spec.key)
    assert info.value_size == ctypes.sizeof(spec.value)
    assert info.max_entries == spec.entries(loaded.sizes)


def test_no_unlisted_maps(loaded):
    from bcc import libbcc
    lib, module = libbcc.lib, loaded.program.bpf.module
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    names = {lib.bpf_table_name(module, i).decode() for i in range(lib.bpf_num_tables(module))}
    assert names == {s.name for s in MAP_SPECS}


def test_pinned_layout_mismatch_is_refused(loaded, tmp_path):
    from fastlb.errors import BpfError
    from fastlb.kernel.layout import Sizes, check_pinned_layouts
    other = Sizes(max_vips=loaded.sizes.max_vips, max_backends=loaded.sizes.max_backends,
                  ring_size=loaded.sizes.ring_size, conntrack_size=loaded.sizes.conntrack_size * 2)
    with pytest.raises(BpfError, match="conntrack"):
        check_pinned_layouts(loaded.pin_dir, other)
    check_pinned_layouts(loaded.pin_dir, loaded.sizes)  # the same sizes are accepted
