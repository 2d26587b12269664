"""ModelConfig: the validated subset of an HF config.json that moska executes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moska.model import mlkv
from moska.model.errors import (
    CorruptCheckpointError,
    MissingFileError,
    ModelLoadError,
    UnsupportedArchitectureError,
)

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """Map 'bf16' / 'bfloat16' / torch.bfloat16 (and fp16, fp32 spellings) to a torch dtype."""
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported {what} {value!r}: use one of bfloat16, float16, float32")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. rope_type 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"config.json: rope scaling type {self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ModelLoadError(f"config.json: rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ModelLoadError(
                    "config.json: llama3 rope scaling needs original_max_position_embeddings"
                )
            if self.high_freq_factor <= self.low_freq_factor:
                raise ModelLoadError(
                    "config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor"
                )


@dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. Build with `ModelConfig.from_dict` / `from_file`."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; attention_bias)
    o_bias: bool = False  # bias on o_proj (attention_bias on Llama/Qwen3)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    torch_dtype: torch.dtype | None = None  # the checkpoint's dtype, if stated
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # MLKV: layer i attends to the KV of layer kv_source_layers[i]; () = every layer its own
    # (model/mlkv.py: the formats read from config.json)
    kv_source_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"config.json: architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"config.json: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(
                f"config.json: head_dim must be even for RoPE, got {self.head_dim}"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelLoadError("config.json: rms_norm_eps and rope_theta must be > 0")
        if self.kv_source_layers:
            mlkv.validate_sources(self.kv_source_layers, self.num_layers)

    # Derived sizes.
    @property
    def group_size(self) -> int:
        """G = Hq // Hkv: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that own KV (all of them unless MLKV); slot j is kv_layers[j]."""
        return mlkv.kv_layers(self.kv_source_layers, self.num_layers)

    @property
    def num_kv_layers(self) -> int:
        """Layers of KV a cache holds per token (< num_layers for an MLKV model)."""
        return len(self.kv_layers)

    @property
    def kv_slots(self) -> tuple[int, ...]:
        """Layer i -> the KV slot (index into kv_layers) it reads."""
        return mlkv.kv_slots(self.kv_source_layers, self.num_layers)

    def owns_kv(self, layer: int) -> bool:
        """Whether `layer` has k/v projections and writes KV (False: it shares a source's)."""
        return not self.kv_source_layers or self.kv_source_layers[layer] == layer

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token takes in a cache of `dtype`, over all KV layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_kv_layers * self.kv_size * elem

    @property
    def sm_scale(self) -> float:
        """Softmax scale the attention callable must use: head_dim ** -0.5."""
        return self.head_dim**-0.5

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ModelLoadError as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse an HF config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        arch = _architecture(raw)
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            intermediate = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise ModelLoadError(f"config.json: missing required key {e.args[0]!r}") from None
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = raw.get("head_dim") or hidden // heads
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedArchitectureError(
                f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only silu)"
            )
        if raw.get("mlp_bias"):
            raise UnsupportedArchitectureError("config.json: mlp_bias=true is not supported")
        theta, scaling = _rope(raw)
        if raw.get("sliding_window") and raw.get("use_sliding_window", True):
            # moska attends over the full context; sliding windows are ignored.
            logger.warning(
                "config.json: sliding_window=%s is ignored: moska uses full attention",
                raw["sliding_window"],
            )
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        try:
            torch_dtype = parse_dtype(dtype, what="dtype") if dtype else None
        except ValueError as e:
            raise UnsupportedArchitectureError(f"config.json: {e}") from None
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate_size=intermediate,
            vocab_size=vocab,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=torch_dtype,
            bos_token_id=_single_id(raw.get("bos_token_id")),
            eos_token_ids=_id_tuple(raw.get("eos_token_id")),
            kv_source_layers=mlkv.parse_sources(raw, layers),
        )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if not archs and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[raw["model_type"]]
    named = archs or [raw.get("model_type")]
    raise UnsupportedArchitectureError(
        f"config.json: architecture {', '.join(map(str, named))} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelLoadError("config.json: rope_parameters / rope_scaling must be objects")
    merged = {**params, **scaling}
    theta = float(raw.get("rope_theta") or merged.get("rope_theta") or 10000.0)
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type == "default":
        return theta, RopeScaling()
    orig = merged.get("original_max_position_embeddings")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig is not None else None,
    )


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _single_id(value: Any) -> int | None:
    ids = _id_tuple(value)
    return ids[0] if ids else None
