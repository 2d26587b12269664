"""Make an MLKV variant of a checkpoint: consecutive layers grouped by ``share`` attend to
one KV, computed in the group's first layer (see model/mlkv.py for the config format).

The group's KV projection (k_proj, v_proj, their biases and Qwen3's k_norm) is either the
mean of the group's projections (``merge="mean"``, the initialisation MLKV and the GQA
paper use before uptraining) or the first layer's unchanged (``"first"``); the other
layers' k/v tensors are dropped. Both are applied to the first layer's input, which is what
the shared KV sees. No training follows: the result is for measuring how much quality the
sharing itself costs (bench/mlkv_quality.py), not a model to serve as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moska.model import mlkv
from moska.model.config import ModelConfig
from moska.model.convert import Checkpoint, ConvertError, write_checkpoint
from moska.model.errors import ModelLoadError

MERGES = ("mean", "first")
# a layer's tensors that make its KV (those present in the checkpoint are merged)
_KV_TENSORS = (
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.k_norm.weight",
)


@dataclass(frozen=True)
class MLKVReport:
    out: Path
    kv_source_layers: tuple[int, ...]
    merge: str
    kv_bytes_per_token_before: int  # in the checkpoint's dtype
    kv_bytes_per_token_after: int

    def describe(self) -> str:
        b, a = self.kv_bytes_per_token_before, self.kv_bytes_per_token_after
        return (
            f"wrote {self.out}: kv_source_layers={list(self.kv_source_layers)} "
            f"(merge {self.merge}); KV bytes per token {b} -> {a} ({a / b:.0%})"
        )


def convert_mlkv(model: str | Path, out: str | Path, *, share: int, merge: str) -> MLKVReport:
    """Write the MLKV variant of the checkpoint at ``model`` to ``out``."""
    if merge not in MERGES:
        raise ConvertError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    src = Checkpoint(model)
    try:
        config = ModelConfig.from_dict(src.config)
    except ModelLoadError as e:
        raise ConvertError(f"{src.path}: {e}") from None
    if config.kv_source_layers:
        raise ConvertError(f"{src.path}: already shares KV across layers; convert the original")
    if not 2 <= share <= config.num_layers:
        raise ConvertError(f"--share must be in [2, {config.num_layers}] (layers), got {share}")
    sources = mlkv.share_groups(config.num_layers, share)
    groups: dict[int, list[int]] = {}
    for layer, source in enumerate(sources):
        groups.setdefault(source, []).append(layer)

    merged: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    for source, members in groups.items():
        for suffix in _KV_TENSORS:
            names = [f"model.layers.{i}.{suffix}" for i in members]
            present = [n for n in names if n in src]
            if not present:
                continue
            if len(present) != len(names):
                raise ConvertError(f"{src.path}: {suffix} is in some layers of {members} only")
            dropped.update(names[1:])
            if merge == "mean" and len(names) > 1:
                first = src.get(names[0])
                stacked = torch.stack([first.float()] + [src.get(n).float() for n in names[1:]])
                merged[names[0]] = stacked.mean(dim=0).to(first.dtype)

    tensors_of_file: dict[str, dict[str, torch.Tensor]] = {}
    for fname, names in src.by_file():
        kept = {n: merged[n] if n in merged else src.get(n) for n in names if n not in dropped}
        if kept:
            tensors_of_file[fname] = kept
    new_config = {
        k: v
        for k, v in src.config.items()
        if k not in ("num_key_value_layers", "kv_sharing_target_layer_name")
    }
    new_config["kv_source_layers"] = list(sources)
    new_config["mlkv_conversion"] = {"share": share, "merge": merge, "trained": False}
    write_checkpoint(src, out, new_config, tensors_of_file)
    dtype = config.torch_dtype or torch.float32
    after = ModelConfig.from_dict(new_config)
    return MLKVReport(
        Path(out),
        sources,
        merge,
        config.kv_bytes_per_token(dtype),
        after.kv_bytes_per_token(dtype),
    )
