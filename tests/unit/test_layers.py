"""The import graph of ``src/oceanda`` follows the layers of the design (imports point down).

Read with :mod:`ast` (nothing is imported): every ``import`` / ``from ... import`` of every
module, those inside functions included, relative ones resolved, and ``"oceanda.x"`` strings
(``importlib.import_module`` by name). A package imports only packages of a strictly lower
layer (its own excepted); hydra / omegaconf only in ``cli``; mpi4py only in ``parallel``;
``oceanda.testing`` from no library module; and no two modules import each other (directly or
through others).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "oceanda"

#: the layers, lowest first (a package may import packages of a strictly lower layer)
LAYERS: dict[str, int] = {
    "errors": 0, "typing": 0, "config_dataclass": 0.5,
    "linalg": 1,
    "dynamics": 2, "obs": 2,
    "priors": 3, "data": 3,
    "assim": 4, "metrics": 4,
    "weights": 5, "parallel": 5, "plots": 5,
    "train": 6,
    "validation": 7,
    "cli": 8, "__main__": 9,
    "testing": 99,  # helpers for tests: imported by no library module
}
#: third-party packages confined to one package
CONFINED = {"hydra": "cli", "omegaconf": "cli", "mpi4py": "parallel"}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join((root.name, *parts))


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (never executed)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(root: Path, path: Path, by_name: bool = True, runtime: bool = False) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every import in ``path`` (see the module docstring);
    ``by_name``: with the ``"oceanda.x"`` strings; ``runtime``: without the imports of
    ``if TYPE_CHECKING:`` blocks (annotations only, never executed)."""
    src = path.read_text()
    pkg = module_name(root, path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out: list[tuple[str, int]] = []
    tree = ast.parse(src)
    skip = _type_checking_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            # `from oceanda.assim import fourdvarnet` imports the module oceanda.assim.fourdvarnet
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    if by_name:
        pattern = r"""['"](%s\.[\w.]+)['"]""" % re.escape(root.name)
        out += [(m.group(1), src[:m.start()].count("\n") + 1) for m in re.finditer(pattern, src)]
    return out


def _module_of(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a module of the tree (``oceanda.x.y.Name`` ->
    ``oceanda.x.y``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def layer_violations(root: Path) -> list[str]:
    """Every import of the package at ``root`` that breaks a rule of the module docstring."""
    bad: list[str] = []
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        if own not in LAYERS:
            bad.append(f"{rel}: package '{own}' has no layer (add it to the design's table)")
            continue
        for name, line in imports_of(root, path):
            top = name.split(".")[0]
            if top in CONFINED and own != CONFINED[top]:
                msg = f"{rel}:{line} imports {top} ({top} only in {CONFINED[top]})"
                if msg not in bad:
                    bad.append(msg)
                continue
            target = _module_of(name, modules) if top == root.name else None
            if target is None or target == root.name:
                continue
            other = target.split(".")[1]
            if other == own:
                continue
            msg = (f"{rel}:{line} imports {target}: package '{other}' has no layer" if other not in LAYERS
                   else f"{rel}:{line} imports {target} ({own}, layer {LAYERS[own]} -> {other}, layer {LAYERS[other]})")
            if other not in LAYERS or LAYERS[other] >= LAYERS[own]:
                # `from oceanda.x import y`: one report, for the deepest module imported
                bad = [b for b in bad if not b.startswith(f"{rel}:{line} imports {target.rpartition('.')[0]} ")]
                if not any(b.startswith(f"{rel}:{line} imports {target}.") for b in bad) and msg not in bad:
                    bad.append(msg)
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of the module import graph of the package at ``root`` (strongly connected
    components with more than one module), each sorted. Import statements only: a registry
    naming the modules it loads on first use (``assim.registry``) is not an edge, nor an import
    for annotations only (``if TYPE_CHECKING:``: a module typing its argument as the class of the
    module that calls it)."""
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for name, _ in imports_of(root, path, by_name=False, runtime=True):
            target = _module_of(name, set(modules))
            # a package's __init__ is not an edge (importing oceanda.x.y runs oceanda.x first)
            if target and target != m and modules[target].name != "__init__.py":
                graph[m].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_source_tree_follows_the_layers():
    assert layer_violations(SRC) == []


def test_source_tree_has_no_import_cycles():
    assert import_cycles(SRC) == []


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(LAYERS), packages - set(LAYERS)


@pytest.fixture
def bad_tree(tmp_path):
    """A synthetic ``oceanda`` holding one module per rule broken."""
    root = tmp_path / "oceanda"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "linalg/__init__.py": "",
        "linalg/banded.py": "from oceanda.assim.oi import oi_patch  # upward\n",
        "data/__init__.py": "",
        "data/osse.py": "def f():\n    from oceanda.priors import spde  # sideways, inside a function\n",
        "priors/__init__.py": "",
        "priors/spde.py": "import numpy as np\n",
        # a cycle through an annotation-only import is no cycle at run time: not reported
        "priors/prior.py": "from oceanda.priors.precision import apply\n",
        "priors/precision.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from oceanda.priors.prior import P\n",
        "assim/__init__.py": "",
        "assim/oi.py": "from . import registry\nimport importlib\nimportlib.import_module('oceanda.testing')\n",
        "assim/base.py": "MODULES = {'oi': 'oceanda.assim.oi'}  # by name: no cycle edge\n",
        "assim/registry.py": "from .oi import oi_patch\nfrom .base import MODULES\n",
        "train/__init__.py": "",
        "train/loop.py": "from omegaconf import DictConfig\nimport mpi4py\nfrom ..cli import main  # relative\n",
        "cli/__init__.py": "import hydra\nfrom mpi4py import MPI\n",
        "testing.py": "",
        "shiny/__init__.py": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_check_fails_on_each_broken_rule(bad_tree):
    """The check can fail: each planted violation is reported, nothing else."""
    bad = layer_violations(bad_tree)
    expected = [
        "assim/oi.py:3 imports oceanda.testing (assim, layer 4 -> testing, layer 99)",
        "cli/__init__.py:2 imports mpi4py (mpi4py only in parallel)",
        "data/osse.py:2 imports oceanda.priors.spde (data, layer 3 -> priors, layer 3)",
        "linalg/banded.py:1 imports oceanda.assim.oi (linalg, layer 1 -> assim, layer 4)",
        "shiny/__init__.py: package 'shiny' has no layer (add it to the design's table)",
        "train/loop.py:1 imports omegaconf (omegaconf only in cli)",
        "train/loop.py:2 imports mpi4py (mpi4py only in parallel)",
        "train/loop.py:3 imports oceanda.cli (train, layer 6 -> cli, layer 8)",
    ]
    assert sorted(bad) == sorted(expected), "\n".join(bad)
    assert import_cycles(bad_tree) == [["oceanda.assim.oi", "oceanda.assim.registry"]]
