"""The package's shape: lower layers never import higher ones, no import circle, a public face.

The rule is read from the source (every ``import``/``from ... import`` of a ``vmmswap`` module,
type-checking imports included), so a violation fails here before it becomes a circle at run
time. A negative control feeds the checker a synthetic upward import.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import vmmswap

SRC = Path(vmmswap.__file__).resolve().parent
#: Height of each top-level part of the package; an import may only go to the same or lower.
RANK = {"kernel": 0, "uffd": 1, "dataplane": 2, "control": 3, "snapshot": 3, "storage": 3,
        "cli": 4, "vm": 4, "__main__": 5}


def imports_of(source: str) -> list[str]:
    """Every vmmswap module a source imports (absolute imports; the project uses no others)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vmmswap":
                found += [f"vmmswap.{alias.name}" for alias in node.names]
            elif node.module.startswith("vmmswap."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("vmmswap.")]
    return found


def layer_of(module: str) -> str:
    return module.split(".")[1]


def upward_imports(files: dict[str, str]) -> list[tuple[str, str]]:
    """(importing module, imported module) pairs that go up the layers."""
    bad = []
    for name, source in files.items():
        for target in imports_of(source):
            if RANK.get(layer_of(target), -1) > RANK[layer_of(name)]:
                bad.append((name, target))
    return bad


def package_sources() -> dict[str, str]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts == ("__init__",):
            continue   # the face re-exports from every layer, lazily
        files[".".join(("vmmswap", *parts)).removesuffix(".__init__")] = path.read_text()
    return files


def test_every_module_sits_in_a_known_layer() -> None:
    assert {layer_of(name) for name in package_sources()} <= set(RANK)


def test_lower_layers_never_import_higher_ones() -> None:
    assert upward_imports(package_sources()) == []


def test_checker_catches_an_upward_import() -> None:
    files = {"vmmswap.dataplane.x": "from vmmswap.control.status import SwapMetrics\n",
             "vmmswap.uffd.y": "from vmmswap import control\n"}
    assert upward_imports(files) == [("vmmswap.dataplane.x", "vmmswap.control.status"),
                                     ("vmmswap.uffd.y", "vmmswap.control")]


def test_no_import_circle_within_a_layer() -> None:
    sources = package_sources()
    graph = {name: {t for t in imports_of(src) if t in sources and t != name}
             for name, src in sources.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", vmmswap.__all__)
def test_face_exports_resolve(name: str) -> None:
    value = getattr(vmmswap, name)
    assert value is not None
    if name != "__version__":
        assert getattr(importlib.import_module(vmmswap._EXPORTS[name]), name) is value


def test_face_is_lazy_and_rejects_unknown_names() -> None:
    code = ("import sys, vmmswap; assert 'vmmswap.control.controller' not in sys.modules; "
            "from vmmswap import SwapController; "
            "assert 'vmmswap.control.controller' in sys.modules; "
            "import vmmswap as v\ntry:\n v.nope\nexcept AttributeError: print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "ok"


def test_all_lists_exactly_the_exports() -> None:
    assert set(vmmswap.__all__) == {*vmmswap._EXPORTS, "__version__"}
