"""The package's layers: no import cycle, and no lower layer importing a higher one.

Every ``import`` in every module counts, including imports placed inside functions (they are
cycles all the same, only postponed). The layers, lowest first, are those of
``docs/architecture.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import optolab

ROOT = Path(optolab.__file__).parent
LAYERS = {  # package (or top-level module) -> layer; a module may import only lower layers or its own package
    "core": 0,
    "tasks": 1,
    "model": 2,
    "clamps": 3, "measures": 3,
    "protocol": 4,
    "training": 5,
    "experiments": 6, "testing": 6,
    "top": 7,  # optolab/__init__.py, __main__.py, api.py, cli.py
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, here: str, is_package: bool = False) -> set[str]:
    """Every optolab module ``source`` (module ``here``) imports, wherever the statement sits."""
    found: set[str] = set()
    package = here if is_package else here.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "optolab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "optolab":
                continue
            found.add(mod)
            for a in node.names:  # `from optolab.x import y` may import the module optolab.x.y
                if (ROOT.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{mod}.{a.name}")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "top"
    if key not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS and docs/architecture.md")
    return key, LAYERS[key]


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for module, deps in graph().items():
        pkg, rank = layer(module)
        for dep in deps:
            dep_pkg, dep_rank = layer(dep)
            if dep_pkg != pkg and dep_rank >= rank:
                bad.append(f"{module} ({pkg}, layer {rank}) imports {dep} ({dep_pkg}, layer {dep_rank})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            strong(v)
    assert not cycles, cycles


@pytest.mark.parametrize("source, expected", [
    ("from optolab.clamps.engine import ClampForward\n", {"optolab.clamps.engine"}),
    ("def f():\n    from optolab.training import trainer\n", {"optolab.training", "optolab.training.trainer"}),
    ("import optolab.protocol.loader as loader\n", {"optolab.protocol.loader"}),
])
def test_imports_inside_functions_count(source, expected):
    # the walker must see what a reader sees, wherever the import sits
    assert imports_in(source, "optolab.clamps.probe") == expected


def test_relative_imports_resolve():
    assert imports_in("from .engine import ClampForward\n", "optolab.clamps.union") == {"optolab.clamps.engine"}
    assert imports_in("from ..model import hooks\n", "optolab.clamps.union") == {"optolab.model", "optolab.model.hooks"}
