"""No import cycles among moska's modules (STYLE.md): the imports a module runs when it is
imported (top level, and inside its top-level `if` / `try` / `with` blocks, but not under
`if TYPE_CHECKING:` or `if __name__ == "__main__":`, nor inside functions) never lead back
to it. Read from the source with `ast` (milliseconds); a package's implicit import of its
`__init__` is not an edge (Python finds the package already in sys.modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import moska

ROOT = Path(moska.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runs_on_import(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" in test or "__name__" in test:
                continue
            out += _runs_on_import(node.body) + _runs_on_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out += _runs_on_import(block)
        elif isinstance(node, ast.With):
            out += _runs_on_import(node.body)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports when it is imported."""
    mods = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runs_on_import(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            subs = {f"{base}.{a.name}" for a in node.names} & mods.keys()
            edges |= subs
            if len(subs) < len(node.names) and base in mods:  # names taken from `base`
                edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles_in_moska():
    graph = import_graph(ROOT)
    assert len(graph) > 100 and "moska.engine.llm_engine" in graph
    assert cycles(graph) == [], "modules that import each other at import time"


def test_the_check_finds_a_cycle_and_skips_what_does_not_run_on_import(tmp_path):
    pkg = tmp_path / "moska" / "p"
    pkg.mkdir(parents=True)
    (tmp_path / "moska" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from moska.p.a import A\n")
    (pkg / "a.py").write_text("from .b import B\nA = 1\n")
    (pkg / "b.py").write_text(
        "try:\n    from moska.p import c\nexcept ImportError:\n    pass\nB = 2\n"
    )
    (pkg / "c.py").write_text("import moska.p.a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from moska.p import e\n"
        "def f():\n    from moska.p import e\n"
        "if __name__ == '__main__':\n    from moska.p import e\n"
    )
    (pkg / "e.py").write_text("from moska.p.d import f\n")
    graph = import_graph(tmp_path / "moska")
    assert graph["moska.p.b"] == {"moska.p.c"} and graph["moska.p.d"] == set()
    assert cycles(graph) == [["moska.p.a", "moska.p.b", "moska.p.c"]]
