"""The package's layers: no import cycle between its parts, and the method-agnostic engine never reaches up.

Every `import` statement counts, also the ones inside functions (a lazy import hides a cycle, it does not remove it).
A part is a subpackage of vitx_fast (engine, kernels, ops, methods, ...) or a top-level module (api, export, ...);
within methods/, each method package is its own part.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vitx_fast"
# what each lower layer may import from the package (anything not listed is a layering error)
ALLOWED = {
    "_ext": {"_C"},  # the compiled module
    "engine": {"_ext"},
    "kernels": {"_ext", "engine"},
    "ops": {"_ext", "engine", "kernels"},
}


FACADES = {ROOT / "__init__.py", ROOT / "methods" / "__init__.py"}


def part_of(module: str) -> str | None:
    """'vitx_fast.methods.daam.fast' -> 'methods.daam'; 'vitx_fast.engine.vjp' -> 'engine'; None outside."""
    names = module.split(".")
    if names[0] != "vitx_fast" or len(names) == 1:
        return None
    if names[1] == "methods" and len(names) > 2 and (ROOT / "methods" / names[2]).is_dir():
        return f"methods.{names[2]}"
    return names[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    names = list(rel.parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def imports(path: Path) -> set[str]:
    """Absolute names of every vitx_fast module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {m for m in out if m.startswith("vitx_fast")}


def _exists(part: str) -> bool:
    """A module or package of vitx_fast (not a name such as __version__ imported from the facade)."""
    p = ROOT / part.replace(".", "/")
    return p.is_dir() or p.with_suffix(".py").is_file() or any(ROOT.glob(f"{part}.*.so"))


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        if path in FACADES or path.name == "__main__.py":
            continue  # the public facades (they import what they register or re-export) and the entry point
        src = part_of(module_name(path))
        for mod in imports(path):
            dst = part_of(mod)
            if dst is not None and dst != src and _exists(dst):
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_parts():
    found = cycles(edges())
    assert not found, "import cycles between parts of vitx_fast: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_lower_layers_import_only_below(part):
    bad = edges().get(part, set()) - ALLOWED[part]
    assert not bad, f"vitx_fast.{part} imports {sorted(bad)}; it may import only {sorted(ALLOWED[part])}"


def test_methods_do_not_import_private_names_of_other_methods():
    bad = []
    for path in (ROOT / "methods").rglob("*.py"):
        src = part_of(module_name(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and part_of(node.module) not in (src, None):
                dst = part_of(node.module)
                if dst.startswith("methods.") and any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{path.relative_to(ROOT)} imports {[a.name for a in node.names]} from {node.module}")
    assert not bad, "\n".join(bad)


def test_the_checker_finds_a_cycle():
    """The cycle finder itself must be able to fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
