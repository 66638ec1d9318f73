"""The package's shape, checked from the source with ast (no module is imported, no model loaded):

(a) no import circle among routertune's modules (imports inside functions count: they run too);
(b) no module imports a private name (leading underscore) from another module of ours, neither
    ``from m import _x`` nor ``m._x`` on an imported module;
(c) no module of a lower layer imports one of a higher layer (the layers are listed below).

No committed file holding an absolute machine path is tests/test_results_manifest.py's check (every tracked
file). Each check reports every offence at once, so one run lists what to fix.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "routertune"

# (c) The layers, lowest first: a module may import its own layer and those below it, never one above. An entry
# names a module or a package (all its modules; the longest entry wins); "routertune" is the package's
# __init__ alone. A module named nowhere (a new one) fails test_every_module_has_a_layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # what every stage reads: configuration, file writing, statistics, architecture facts, the base model
    (
        "foundation",
        (
            "routertune.config",
            "routertune.files",
            "routertune.stats",
            "routertune.progress",
            "routertune.routing.arch",
            "routertune.base_model",
        ),
    ),
    # the routing mechanism itself: routers, per-call state, caches, injection, static drop; and the LoRA
    # adapters' saving and loading (train/lora.py: RoutedModel saves and loads them with its routers)
    ("routing", ("routertune.routing", "routertune.train.lora")),
    # the public model and the package's front door
    ("model", ("routertune.model", "routertune")),
    # training routers, and the jobs that use trained routers directly
    ("train", ("routertune.train", "routertune.calibrate", "routertune.generate")),
    # quality measurements
    ("eval", ("routertune.eval",)),
    # speed measurements
    ("bench", ("routertune.bench",)),
    # serving (export of trained routers; vLLM only inside its own modules)
    ("serve", ("routertune.serve",)),
    # reading results, the main job, the command line
    ("report", ("routertune.report",)),
    ("demo", ("routertune.demo",)),
    ("cli", ("routertune.cli",)),
]


# --- reading the source ----------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def driver_files() -> list[Path]:
    """The benchmark drivers: outside the package, importing only its public names."""
    return sorted((ROOT / "benchmarks").glob("*.py"))


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@functools.cache
def syntax_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_of(path: Path, importer: str, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every import in the file, at any depth.
    ``from routertune.x import y`` with y a submodule counts as an import of routertune.x.y."""
    tree = syntax_tree(path)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, importer, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return out


def _ours(module: str, modules: dict[str, Path]) -> bool:
    return module in modules


def module_aliases(path: Path, importer: str, modules: dict[str, Path]) -> dict[str, str]:
    """Local names bound to one of our modules by an import (``from routertune.eval import harness``,
    ``import routertune.stats as stats``)."""
    tree = syntax_tree(path)
    is_package = path.name == "__init__.py"
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, importer, is_package)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        name: {m for m, _, _ in imports_of(path, name, modules) if _ours(m, modules) and m != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, index = len(prefix), i
    return index


# --- (a) ---------------------------------------------------------------------------------------------------------
def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each with one circle through it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_no_import_circle():
    cycles = find_cycles(graph())
    assert not cycles, "import circles (modules that import each other, directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_finder_sees_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# --- (b) ---------------------------------------------------------------------------------------------------------
def private_uses() -> list[str]:
    modules = package_modules()
    files = [(name, path) for name, path in modules.items()]
    files += [(f"{path.parent.name}.{path.stem}", path) for path in driver_files()]
    found = []
    for name, path in files:
        where = path.relative_to(ROOT)
        for module, taken, line in imports_of(path, name, modules):
            if taken and _ours(module, modules) and taken.startswith("_") and not taken.startswith("__"):
                found.append(f"{where}:{line}: from {module} import {taken}")
            if module.split(".")[-1].startswith("_") and _ours(module, modules) and module != name:
                found.append(f"{where}:{line}: imports the private module {module}")
        aliases = module_aliases(path, name, modules)
        for node in ast.walk(syntax_tree(path)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != name
            ):
                found.append(f"{where}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_used_outside_its_module():
    found = private_uses()
    assert not found, (
        "private names (leading underscore) used outside their module: make the shared ones "
        "public (a good name, a docstring) or stop sharing them:\n  " + "\n  ".join(found)
    )


# --- (c) ---------------------------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    missing = [m for m in package_modules() if layer_of(m) is None]
    assert not missing, f"modules missing from LAYERS in {Path(__file__).name}: {missing}"


def test_no_lower_layer_imports_a_higher_one():
    offences = []
    for module, imported in graph().items():
        for other in sorted(imported):
            if layer_of(other) is not None and layer_of(module) is not None and layer_of(other) > layer_of(module):
                offences.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {other} ({LAYERS[layer_of(other)][0]})"
                )
    assert not offences, "imports upward through the layers:\n  " + "\n  ".join(offences)
