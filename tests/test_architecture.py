"""The house's shape, checked on the source: imports go one way (no cycles; pretrain never imports
eval; augment never imports pretrain or eval; nothing below launch imports launch), and no module
grows past ~400 lines. Every import counts: module level, inside functions, under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package name -> folder, as pyproject.toml's [tool.setuptools.package-dir] maps them
PACKAGES = {"selfsup": "selfsup", "selfsup.augment": "augment", "selfsup.eval": "eval",
            "selfsup.launch": "launch", "selfsup.pretrain": "pretrain"}  # fmt: skip
MAX_LINES = 400
# (importer prefix, imported prefix) pairs that would run against the house's direction
FORBIDDEN = [
    ("selfsup.pretrain", "selfsup.eval"), ("selfsup.pretrain", "selfsup.launch"),
    ("selfsup.augment", "selfsup.pretrain"), ("selfsup.augment", "selfsup.eval"),
    ("selfsup.augment", "selfsup.launch"), ("selfsup.eval", "selfsup.launch"),
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    out = {}
    for pkg, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "selfsup" and parts and f"selfsup.{parts[0]}" in PACKAGES:
                continue
            out.setdefault(name, path)
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """selfsup modules ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("selfsup")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfsup"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_walk_sees_the_package() -> None:
    g = graph()
    assert {"selfsup.pretrain.loop.train", "selfsup.pretrain.methods.base", "selfsup.eval.run"} <= set(g)
    assert "selfsup.pretrain.methods.base" in g["selfsup.pretrain.methods.simclr"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    g = graph()
    g["selfsup.data_info"] = g["selfsup.data_info"] | {"selfsup.pretrain.loop.train"}
    assert find_cycle(g) is not None


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_imports_run_one_way(importer: str, imported: str) -> None:
    bad = sorted(f"{a} -> {b}" for a, deps in graph().items() if a.startswith(importer)
                 for b in deps if b.startswith(imported))  # fmt: skip
    assert not bad, f"{importer} must not import {imported}: " + ", ".join(bad)


def test_no_module_over_the_limit() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    over = {n: k for n, k in long.items() if k > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split by job): {over}"


def sub_folders() -> set[str]:
    """The packages one level below a top-level package (``selfsup.pretrain.loop``, ...)."""
    return {n for n, p in modules().items() if p.name == "__init__.py" and n.count(".") == 2}


def folder(module: str, subs: set[str]) -> str | None:
    """The sub-folder a module lives in (``selfsup.pretrain.loop.train`` and the package
    ``selfsup.pretrain.loop`` itself -> ``selfsup.pretrain.loop``); None for a module directly in a
    top-level package (``selfsup.pretrain.build``)."""
    top3 = ".".join(module.split(".")[:3])
    return top3 if top3 in subs else None


def folder_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    subs = sub_folders()
    out: dict[str, set[str]] = {}
    for a, deps in g.items():
        fa = folder(a, subs)
        if fa is None:
            continue
        out.setdefault(fa, set()).update(f for b in deps if (f := folder(b, subs)) not in (None, fa))
    return out


def test_the_folder_walk_sees_the_sub_folders() -> None:
    fg = folder_graph(graph())
    assert {"selfsup.pretrain.loop", "selfsup.pretrain.run", "selfsup.pretrain.hooks",
            "selfsup.pretrain.methods", "selfsup.launch.cli", "selfsup.launch.demo"} <= set(fg)  # fmt: skip
    assert "selfsup.pretrain.run" in fg["selfsup.pretrain.loop"]


def test_no_two_sub_folders_import_each_other() -> None:
    cycle = find_cycle(folder_graph(graph()))
    assert cycle is None, "sub-folders import each other: " + " -> ".join(cycle)


def test_folder_check_finds_a_planted_back_import() -> None:
    g = graph()
    g["selfsup.pretrain.run.rundir"] = g["selfsup.pretrain.run.rundir"] | {"selfsup.pretrain.loop.train"}
    assert find_cycle(folder_graph(g)) is not None
