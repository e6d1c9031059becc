"""The package's layers, read from its imports (AST, nothing executed): every import points
down, siblings stay apart, and no module imports itself back through others.

    runtime < config < {model, data} < checkpoint < train < {evaluation, convert}
        < {cli, gpu_check}
    plan sits on model and config only (training never imports it, it never imports training)
    tools/, launch/, benchmarks/ sit on top and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mm1_megatron"

# Each layer and the layers directly beneath it; a layer may import the transitive closure.
BENEATH: dict[str, set[str]] = {
    "runtime": set(),
    "config": {"runtime"},
    "model": {"config"},
    "data": {"config"},
    "plan": {"model"},
    "checkpoint": {"model", "data"},
    "train": {"checkpoint"},
    "evaluation": {"train"},
    "convert": {"train"},
    "cli": {"plan", "evaluation", "convert"},
    "gpu_check": {"plan", "evaluation", "convert"},  # mm1-gpu-check, beside mm1-train
    "top": {"cli", "gpu_check"},  # tools/, launch/, benchmarks/
}
ROOT = "root"  # mm1_megatron/__init__.py: importable by everyone, imports nothing of ours
# Imports that break the rules and are tolerated for now: (importer, imported) modules.
ALLOWED: set[tuple[str, str]] = set()


def may_import() -> dict[str, set[str]]:
    closure = {}
    for layer in BENEATH:
        seen, todo = set(), list(BENEATH[layer])
        while todo:
            below = todo.pop()
            if below not in seen:
                seen.add(below)
                todo.extend(BENEATH[below])
        closure[layer] = seen | {layer, ROOT}
    return closure


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = {}
    for top in (PACKAGE, "tools", "launch", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            files[module_name(path)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file (functions and
    TYPE_CHECKING blocks included). `from a import b` names module a.b when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    modules = set(files)
    return {name: imports_of(name, path, modules) for name, path in files.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return "top"
    if len(parts) == 1:
        return ROOT
    layer = parts[1]
    if layer not in BENEATH:
        raise AssertionError(f"{module}: {PACKAGE}.{layer} is in no layer; place it in "
                             "BENEATH (tests/test_layering.py)")
    return layer


def violations(graph: dict[str, set[str]]) -> list[str]:
    allowed = may_import()
    bad = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer_of(importer), layer_of(target)
            if a == ROOT and b != ROOT:
                bad.append(f"{importer} -> {target}: the package root imports nothing")
            elif a != ROOT and b not in allowed[a] and (importer, target) not in ALLOWED:
                bad.append(f"{importer} ({a}) -> {target} ({b}): {a} may import only "
                           f"{', '.join(sorted(allowed[a] - {a, ROOT})) or 'nothing of ours'}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_import_points_down_with_an_empty_allow_list():
    assert not ALLOWED, "the allow-list must stay empty"
    graph = import_graph()
    assert len([m for m in graph if m.startswith(PACKAGE)]) > 50  # the package was read
    assert any("mm1_megatron.checkpoint" in t for t in graph["mm1_megatron.train.loop"])
    bad = violations(graph)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_upward_imports_sibling_imports_and_cycles():
    """The checker itself: a made-up graph with each kind of fault."""
    graph = {
        "mm1_megatron.data.loader": {"mm1_megatron.model.mm1"},  # sibling
        "mm1_megatron.model.mm1": {"mm1_megatron.config"},
        "mm1_megatron.config": set(),
        "mm1_megatron.train.loop": {"mm1_megatron.evaluation.callback", "mm1_megatron.plan"},
        "mm1_megatron.evaluation.callback": {"mm1_megatron.train.loop"},  # cycle
        "mm1_megatron.plan": {"mm1_megatron.model.mm1"},
    }
    bad = violations(graph)
    assert any(b.startswith("mm1_megatron.data.loader (data) -> mm1_megatron.model.mm1")
               for b in bad)
    assert any("mm1_megatron.train.loop (train) -> mm1_megatron.evaluation.callback" in b
               for b in bad)
    assert any("mm1_megatron.train.loop (train) -> mm1_megatron.plan (plan)" in b for b in bad)
    assert not any(b.startswith("mm1_megatron.plan ") for b in bad)
    assert cycles(graph) == [["mm1_megatron.evaluation.callback", "mm1_megatron.train.loop"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mm1_megatron.newthing.x")


def test_relative_imports_resolve(tmp_path):
    modules = {"mm1_megatron.runtime.cpu_compat", "mm1_megatron.runtime.cpu_compat._registry",
               "mm1_megatron.runtime.backends"}
    src = tmp_path / "patch.py"
    src.write_text("from ._registry import _once\nfrom ..backends import Backends\n")
    assert imports_of("mm1_megatron.runtime.cpu_compat.patch", src, modules) == {
        "mm1_megatron.runtime.cpu_compat._registry", "mm1_megatron.runtime.backends"}
