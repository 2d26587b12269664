"""The layering docs/CONTRACTS.md promises: `kernels/` imports nothing from the rest of moska
(kernels stay reusable and testable alone), and `cache/` imports nothing from `engine/` (the
block manager reads requests through its `CacheRequest` protocol). Read from the source with
`ast`, so imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import moska

ROOT = Path(moska.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(folder: str, allowed: str, forbidden: str) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(forbidden) and not name.startswith(allowed):
                out.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    return out


@pytest.mark.parametrize(
    ("folder", "allowed", "forbidden"),
    [("kernels", "moska.kernels", "moska"), ("cache", "moska.cache", "moska.engine")],
)
def test_layering_holds(folder, allowed, forbidden):
    assert (ROOT / folder).is_dir()
    assert violations(folder, allowed, forbidden) == []


def test_the_check_sees_absolute_relative_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "moska" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "from moska.engine import request\n"
        "def f():\n"
        "    from ..library import loaded\n"
        "    import moska.config\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "moska")
    found = violations("kernels", "moska.kernels", "moska")
    assert any("moska.engine" in v for v in found)
    assert any("moska.library.loaded" in v for v in found)
    assert any(v.endswith("moska.config") for v in found)
