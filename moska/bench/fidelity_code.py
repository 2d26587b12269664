"""Held-out code for the fidelity benchmark's quality signal: per package, a library of
files from one of its folders and target files from the same folder that the library
leaves out. Every file is led by <|endoftext|> (id 0), as moska-code-20m saw files in
training, so a target reads after its library as it would in a packed training stream."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

FOLDERS = {"networkx": "algorithms", "sympy": "core"}  # folders with many related files
MAX_FILE_BYTES = 200_000


@dataclass(frozen=True)
class CodeTask:
    package: str
    library_docs: list[tuple[str, list[int]]]  # (file name, token ids), BOS-led
    targets: list[tuple[str, list[int]]]  # (file name, first target_tokens ids), BOS-led

    @property
    def library_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.library_docs)


def code_tasks(
    tokenizer,
    library_tokens: int,
    num_targets: int,
    target_tokens: int,
    seed: int = 0,
    packages: tuple[str, ...] = tuple(FOLDERS),
) -> list[CodeTask]:
    """One CodeTask per package: library files packed up to ``library_tokens`` (the last
    one cut), then ``num_targets`` other files of at least half ``target_tokens``."""
    tasks = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{pkg} is not installed in this venv: it is the held-out text")
        folder = Path(next(iter(spec.submodule_search_locations))) / FOLDERS[pkg]
        files = sorted(p for p in folder.glob("*.py") if 0 < p.stat().st_size <= MAX_FILE_BYTES)
        random.Random(seed).shuffle(files)
        docs, targets, used = [], [], 0
        for f in files:
            try:
                ids = list(tokenizer.encode(f.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                continue
            name = f"{pkg}/{FOLDERS[pkg]}/{f.name}"
            if used < library_tokens:
                ids = ids[: library_tokens - used]
                docs.append((name, ids))
                used += len(ids)
            elif len(ids) >= target_tokens // 2:
                targets.append((name, ids[:target_tokens]))
                if len(targets) == num_targets:
                    break
        tasks.append(CodeTask(pkg, docs, targets))
    return tasks
