"""`moska convert`: checkpoint-to-checkpoint conversions that shrink the KV cache.

This module holds what every conversion shares — reading a Hugging Face directory's tensors
lazily (single file or shards), writing the result in the same layout, copying the
tokenizer. Each conversion lives in its own module: `convert_mlkv.py` (layers share KV),
`convert_kv_heads.py` (fewer KV heads);
the `moska convert` command is `moska/cli_convert.py`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moska.model.loader import INDEX_FILE, SINGLE_FILE

# files of a checkpoint directory that a conversion rewrites instead of copying
_REWRITTEN = {"config.json", INDEX_FILE}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says what to change."""


class Checkpoint:
    """An HF checkpoint directory opened for reading: config dict and tensors by name,
    read on demand (a conversion holds a few layers' tensors at a time, not the model)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise ConvertError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        self.config: dict[str, Any] = json.loads(config.read_text())
        self.files: dict[str, list[str]] = {}  # weight file name -> its tensor names, in order
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                self.files.setdefault(fname, []).append(name)
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(str(self.path / SINGLE_FILE), framework="pt") as f:
                self.files[SINGLE_FILE] = list(f.keys())
        else:
            raise ConvertError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors only)")
        self._file_of = {n: fname for fname, names in self.files.items() for n in names}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path / self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    def by_file(self) -> Iterator[tuple[str, list[str]]]:
        """(weight file name, its tensor names), in file order."""
        yield from sorted(self.files.items())


def write_checkpoint(
    src: Checkpoint,
    out: str | Path,
    config: dict[str, Any],
    tensors_of_file: dict[str, dict[str, torch.Tensor]],
) -> Path:
    """Write ``out/``: config.json, the weight files (same names as ``src``; an index when
    there are several) and every other file of ``src`` (tokenizer, generation config)
    except its README. Refuses an ``out`` that exists and is not empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out}: exists and is not empty; give a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    weight_files = set(src.files)
    for item in sorted(src.path.iterdir()):
        skip = item.name in _REWRITTEN | weight_files or item.name.lower().startswith("readme")
        if item.is_file() and not skip:
            shutil.copy2(item, out / item.name)
    weight_map = {}
    for fname, tensors in tensors_of_file.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / fname),
                  metadata={"format": "pt"})  # fmt: skip
        weight_map.update({name: fname for name in tensors})
    if len(tensors_of_file) > 1 or (src.path / INDEX_FILE).is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
