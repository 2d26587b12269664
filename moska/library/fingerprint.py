"""The model fingerprint a library records: what its KV depends on (architecture, sizes,
dtype, a hash of the checkpoint's config and tensor layout). Plain Python, no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFingerprint:
    """What a library's KV depends on. ``weights_hash`` identifies the checkpoint.

    ``weights_hash`` is a sha256 over ``config.json`` and, for every ``*.safetensors``
    file, its name, size and JSON header (tensor names, dtypes, shapes, offsets). It is
    fast (kilobytes read, not the 16+ GB of weights) and tells checkpoints apart by
    architecture and layout; it does not prove the weight values are intact (two
    checkpoints with identical layout but different values, e.g. two fine-tunes saved
    the same way, hash alike only if their config.json is also identical). ``None`` when
    the model has no files (random weights built in memory).
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    weights_hash: str | None = None
    # MLKV models: layers that own KV (one library file each); None: every layer
    num_kv_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def mismatches(self, other: ModelFingerprint) -> list[str]:
        """Names of the fields in which ``other`` differs from ``self``."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        h = (self.weights_hash or "no files")[:12]
        return (
            f"{self.architecture} hidden={self.hidden_size} layers={self.num_layers} "
            f"heads={self.num_heads}/{self.num_kv_heads} head_dim={self.head_dim} "
            f"vocab={self.vocab_size} {self.dtype} weights={h}"
        )


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def weights_hash(path: str | os.PathLike | None) -> str | None:
    """sha256 over config.json and the safetensors headers + sizes (see ModelFingerprint)."""
    if path is None:
        return None
    path = Path(path)
    files = (
        sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    )
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not files and not config.exists():
        return None
    h = hashlib.sha256()
    if config.exists():
        h.update(b"config.json\0" + config.read_bytes())
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = fh.read(min(n, 100_000_000))
        h.update(f"{f.name}\0{size}\0".encode() + header)
    return h.hexdigest()


def model_fingerprint(loaded_model: Any) -> ModelFingerprint:
    """Fingerprint of a ``LoadedModel(model, config, tokenizer, path)``."""
    config = loaded_model.config
    model = loaded_model.model
    dtype = _cfg(config, "dtype", "torch_dtype")
    params = getattr(model, "parameters", None)
    if params is not None:
        first = next(iter(params()), None)
        if first is not None:
            dtype = first.dtype
    num_heads = int(_cfg(config, "num_attention_heads", "num_heads"))
    hidden = int(config.hidden_size)
    return ModelFingerprint(
        architecture=str(_cfg(config, "architecture", "model_type", default="unknown")),
        hidden_size=hidden,
        num_layers=int(_cfg(config, "num_hidden_layers", "num_layers")),
        num_heads=num_heads,
        num_kv_heads=int(_cfg(config, "num_key_value_heads", "num_kv_heads", default=num_heads)),
        head_dim=int(_cfg(config, "head_dim", default=hidden // num_heads)),
        vocab_size=int(_cfg(config, "vocab_size", default=0)),
        dtype=_dtype_name(dtype),
        weights_hash=weights_hash(getattr(loaded_model, "path", None)),
        num_kv_layers=_num_kv_layers(config),
    )


def _num_kv_layers(config: Any) -> int | None:
    """The KV layers of an MLKV model; None when every layer has KV (older manifests)."""
    kv = getattr(config, "num_kv_layers", None)
    layers = _cfg(config, "num_hidden_layers", "num_layers")
    return int(kv) if kv is not None and kv != layers else None
