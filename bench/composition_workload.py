"""The workload of the composition benchmarks (composition_quality.py and its engine form
composition_repair_engine.py): held-out networkx packages, one file the request and the
others split round-robin into libraries; saved to / read from JSON so a machine without this
venv's networkx reads the same tokens (bench/composition_windows.json)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

MAX_FILE_BYTES = 200_000


def packages(min_files: int) -> list[list[Path]]:
    """networkx directories (tests excluded) with at least ``min_files`` source files."""
    spec = importlib.util.find_spec("networkx")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("networkx is not installed in this venv: it is the held-out text")
    base = Path(next(iter(spec.submodule_search_locations)))
    out = []
    for d in sorted(p for p in base.rglob("*") if p.is_dir()):
        if "tests" in d.parts or d.name.startswith("__"):
            continue
        files = sorted(
            f
            for f in d.glob("*.py")
            if f.name != "__init__.py" and f.stat().st_size <= MAX_FILE_BYTES
        )
        if len(files) >= min_files:
            out.append(files)
    return out


def encode(tok, path: Path) -> list[int]:
    return list(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False))


def windows(tok, args) -> list[tuple[Path, list[int], list[list[tuple[Path, list[int]]]]]]:
    """The workload: per package, (request path, request ids, files of each library), of the
    first ``args.samples`` packages with enough files (a package whose files are too short
    is skipped); the engine form (composition_repair_engine.py) reads the same windows.
    ``args.windows``: read them from that JSON file instead (``save_windows``: a machine
    without this venv's networkx reads the same tokens)."""
    if getattr(args, "windows", None):
        return load_windows(args.windows, args.samples)
    bos = tok.bos_token_id
    need = args.libraries * args.files_per_library + 1
    out = []
    for files in packages(need)[: args.samples]:
        encoded = [(f, encode(tok, f)) for f in files]
        encoded = [(f, ids) for f, ids in encoded if len(ids) >= 64]
        if len(encoded) < need:
            continue
        req_path, req_ids = max(encoded, key=lambda e: len(e[1]))  # the longest is the request
        others = [e for e in encoded if e[0] != req_path][: need - 1]
        request = [bos, *req_ids[: args.request_tokens - 1]]
        groups = [others[i :: args.libraries] for i in range(args.libraries)]
        out.append((req_path, request, groups))
    return out


def save_windows(path: str, items, file_tokens: int) -> None:
    """The windows as JSON: request path, request ids, files per library (path, the first
    ``file_tokens`` ids: what a run reads of them)."""
    rows = [
        {
            "request": str(p),
            "ids": req,
            "groups": [[[str(f), ids[:file_tokens]] for f, ids in g] for g in gs],
        }
        for p, req, gs in items
    ]
    Path(path).write_text(json.dumps(rows, separators=(",", ":")))


def load_windows(path: str, samples: int):
    rows = json.loads(Path(path).read_text())[:samples]
    return [
        (Path(r["request"]), r["ids"], [[(Path(f), ids) for f, ids in g] for g in r["groups"]])
        for r in rows
    ]
