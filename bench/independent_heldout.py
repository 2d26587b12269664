"""Held-out text for ``bench/independent_quality.py``: the networkx and sympy sources in
this venv (the quality model was trained on neither), targets one per directory, and each
target's library made of its package's other files, nearest first."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

PACKAGES = ("networkx", "sympy")
MAX_FILE_BYTES = 200_000  # the training corpus's filter


def package_files(pkg: str) -> list[Path]:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{pkg} is not installed in this venv: it is the held-out text")
    base = Path(next(iter(spec.submodule_search_locations)))
    return sorted(
        p
        for p in base.rglob("*.py")
        if p.stat().st_size <= MAX_FILE_BYTES and "tests" not in p.parts
    )


def read_ids(tok, path: Path) -> list[int]:
    try:
        return tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    except UnicodeDecodeError:
        return []


def pick_targets(tok, files: list[Path], n: int, min_tokens: int, seed: int) -> list[Path]:
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    pool = [f for f in files if len(by_dir[f.parent]) >= 8 and f.name != "__init__.py"]
    random.Random(seed).shuffle(pool)
    out, dirs = [], set()
    for f in pool:
        if f.parent in dirs:
            continue  # one target per directory: libraries differ
        if len(read_ids(tok, f)) >= min_tokens:
            out.append(f)
            dirs.add(f.parent)
        if len(out) == n:
            break
    return out


def library_docs(tok, target: Path, files: list[Path], budget: int, per_doc: int):
    """The package's other files, nearest first: the target's directory (modules it names
    first), then the rest of the package; each cut to ``per_doc`` tokens, ``budget`` total."""
    text = target.read_text(encoding="utf-8")
    others = [f for f in files if f != target]
    named = set(re.findall(r"\b(\w+)\b", text))

    def rank(f: Path) -> tuple:
        return (f.parent != target.parent, f.stem not in named, str(f))

    docs, total = [], 0
    for f in sorted(others, key=rank):
        ids = read_ids(tok, f)[:per_doc]
        if len(ids) < 32:
            continue
        ids = ids[: budget - total]
        docs.append((str(f.name), ids))
        total += len(ids)
        if total >= budget:
            break
    return docs
