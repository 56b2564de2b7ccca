"""The package layout's rules, checked over fastlb/'s source (no root, no import).

* The module import graph has no cycle (imports inside functions count; the
  ones under ``if TYPE_CHECKING:`` do not, they never run).
* Only a module that loads a program imports the BCC loader: map layouts live
  in fastlb.kernel.layout, so reading a map needs no loader.
* The product does not import the lab (the CLI, which registers the
  ``fastlb lab`` group, aside), and imports without scapy, rich or matplotlib.
* The BPF sources are package data that an installed fastlb finds.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.resources
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from fastlb.kernel import cdefs

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "fastlb"
LAB_EXTRA = ("scapy", "rich", "matplotlib")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "bpf" not in p.relative_to(PKG).parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, skipping ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (i for n in node.orelse for i in _imports(n))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def imports_of(name: str) -> dict[str, set[str]]:
    """The fastlb modules ``name`` imports, each with the names it takes from it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, set[str]] = {}
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    out.setdefault(alias.name, set())
            continue
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:
                out.setdefault(sub, set())
            elif base in MODULES:
                out.setdefault(base, set()).add(alias.name)
    out.pop(name, None)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_sees_the_layers():
    assert "fastlb.kernel.maps" in GRAPH["fastlb.dataplane.tables"]
    assert "fastlb.core._pure" in GRAPH["fastlb.core"]


def test_no_import_cycle():
    state: dict[str, int] = {}   # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in GRAPH[name]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name)


# Each package may import only the ones before it (fastlb/__init__ holds only __version__).
LAYERS = ["fastlb", "fastlb.errors", "fastlb.config", "fastlb.kernel", "fastlb.core", "fastlb.dataplane",
          "fastlb.testing", "fastlb.controller", "fastlb.lab", "fastlb.cli"]


def layer(module: str) -> int:
    return LAYERS.index(".".join(module.split(".")[:2]))


def test_each_layer_imports_only_the_layers_below_it():
    assert sorted(LAYERS[1:]) == sorted({".".join(m.split(".")[:2]) for m in MODULES if m != "fastlb"})
    for name, deps in GRAPH.items():
        for dep in deps:
            assert layer(dep) <= layer(name), f"{name} ({LAYERS[layer(name)]}) imports {dep} from a layer above"


def test_only_a_module_that_loads_a_program_imports_the_loader():
    loader = "fastlb.kernel.loader"
    for name, deps in GRAPH.items():
        if loader in deps:
            assert "Program" in deps[loader], f"{name} imports the loader only for {sorted(deps[loader])}"
    assert "fastlb.kernel.loader" not in GRAPH["fastlb.kernel.maps"]


def test_the_product_does_not_import_the_lab():
    for name, deps in GRAPH.items():
        if name.startswith(("fastlb.lab", "fastlb.cli")):
            continue
        lab = sorted(d for d in deps if d.startswith("fastlb.lab"))
        assert not lab, f"{name} imports {lab}"


def test_the_product_imports_without_the_lab_extra():
    hide = "".join(f"sys.modules[{m!r}] = None\n" for m in LAB_EXTRA)
    # __main__ modules run the CLI when imported; the last line runs it on purpose.
    product = [n for n in MODULES if not n.startswith(("fastlb.lab", "fastlb.testing")) and not n.endswith(".__main__")]
    code = "import importlib, sys\n" + hide + f"for m in {product!r}:\n    importlib.import_module(m)\n" \
        "from fastlb.cli import main\nmain(['--help'], standalone_mode=False)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_bpf_sources_are_package_data():
    bpf = importlib.resources.files("fastlb") / "bpf"
    sources = sorted(f"bpf/{p.name}" for p in bpf.iterdir() if p.name.endswith((".c", ".h")))
    assert "bpf/fastlb_kern.c" in sources and "bpf/fastlb_consts.h" in sources
    assert len(sources) == len(list((REPO / "bpf").glob("*.[ch]")))
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["fastlb"]
    assert all(any(fnmatch.fnmatch(s, p) for p in patterns) for s in sources), (sources, patterns)
    assert cdefs.bpf_dir() == (REPO / "bpf").resolve() or os.environ.get(cdefs.ENV_BPF_DIR)


def test_test_files_have_unique_names():
    """pytest imports test files by basename (the test folders are not packages):
    two files of one name in different folders stop the whole run at collection."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
