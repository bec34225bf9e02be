"""Package layering, checked by walking every ``import`` (module level and inside functions) with ``ast``:
the model package imports neither the sleep loop, the evaluation code nor any checkpoint format, and no
two megasleep modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import megasleep

ROOT = Path(megasleep.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """megasleep modules that ``name`` imports (``from pkg import mod`` resolves to the submodule)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("megasleep") and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {n: _imports(n, p, known) for n, p in known.items()}


def test_models_import_no_sleep_eval_or_format_code():
    forbidden = ("megasleep.sleep", "megasleep.eval", "megasleep.checkpoint", "megasleep.train",
                 "megasleep.inference")
    bad = {n: sorted(t for t in deps if t.startswith(forbidden))
           for n, deps in _graph().items() if n.startswith("megasleep.models")}
    assert not {n: d for n, d in bad.items() if d}


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is how packages work, not a circle
    for n, deps in graph.items():
        graph[n] = {d for d in deps if not d.startswith(n + ".")}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_walker_sees_a_planted_circle(tmp_path):
    """The checker itself can fail: two modules importing each other inside functions are found."""
    known = {"megasleep.a": tmp_path / "a.py", "megasleep.b": tmp_path / "b.py"}
    known["megasleep.a"].write_text("def f():\n    from megasleep.b import g\n")
    known["megasleep.b"].write_text("def g():\n    import megasleep.a\n")
    assert _imports("megasleep.a", known["megasleep.a"], known) == {"megasleep.b"}
    assert _imports("megasleep.b", known["megasleep.b"], known) == {"megasleep.a"}
