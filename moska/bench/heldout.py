"""Held-out text of the quality model (moska-code-20m): the networkx and sympy sources
installed in the venv, which its training corpus left out. The quality benchmarks (MLKV,
KV-head compression, FP8, FlexiCache) cut their windows here, so they score the same text."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

PACKAGES = ("networkx", "sympy")
MAX_FILE_BYTES = 200_000  # the training corpus's filter


def heldout_windows(tokenizer, length: int, per_package: int, seed: int) -> dict[str, list]:
    """package -> `per_package` windows of `length` tokens from its shuffled packed stream."""
    out = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{pkg} is not installed in this venv: it is the held-out text")
        base = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in base.rglob("*.py") if p.stat().st_size <= MAX_FILE_BYTES)
        random.Random(seed).shuffle(files)
        stream: list[int] = []
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            stream.extend(tokenizer.encode(text))  # <|endoftext|> + file
            if len(stream) >= length * per_package:
                break
        out[pkg] = [stream[i * length : (i + 1) * length] for i in range(per_package)]
    return out
