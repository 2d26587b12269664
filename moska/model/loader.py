"""load_model: an HF-format directory (config.json + safetensors) -> CausalLM on a device."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from moska.model import mlkv
from moska.model.config import ModelConfig, parse_dtype
from moska.model.errors import CorruptCheckpointError, MissingFileError
from moska.model.llama import CausalLM
from moska.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that moska recomputes; skipped silently.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LoadedModel(NamedTuple):
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None  # None when the directory has no tokenizer.json
    path: Path | None  # None for a model built in memory


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    tensor_parallel=None,
) -> LoadedModel:
    """Load config, weights (single or sharded safetensors) and tokenizer from `path`.

    dtype: None or "auto" -> the checkpoint's dtype (float32 if config.json states none);
    otherwise bfloat16/float16/float32 (or bf16/fp16/fp32). Raises ModelLoadError subclasses.
    tensor_parallel: a `distributed.tensor_parallel.TensorParallel`: build this rank's slice
    of the model and read only its slice of each tensor (LoadedModel.config stays the
    checkpoint's; the model's own config is the slice's).
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: model directory not found")
    config = ModelConfig.from_file(path / "config.json")
    if dtype is None or dtype == "auto":
        dtype = config.torch_dtype or torch.float32
    dtype = parse_dtype(dtype)
    device = torch.device(device)

    files = _weight_files(path)
    if tensor_parallel is None:
        model = CausalLM(config, dtype=dtype, device="meta")
        slices = {}
    else:
        model = tensor_parallel.make_model(config, dtype=dtype, device="meta")
        slices = tensor_parallel.tensor_slices(config)
    model = model.to_empty(device=device)
    model.rotary.reset_inv_freq()
    model.requires_grad_(False).eval()
    _load_weights(model, config, files, dtype, slices)

    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(path, extra_eos_token_ids=config.eos_token_ids)
    else:
        logger.warning("%s: no tokenizer.json; only token-id prompts can be served", path)
    return LoadedModel(model, config, tokenizer, path)


def model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> CausalLM:
    """A CausalLM whose parameters *are* `tensors` (a model's `state_dict()`; no copy), on
    their device and dtype. A library build process (`server/build_process.py`) rebuilds the
    server's model around the weights it received through shared memory (CPU) or CUDA IPC
    instead of loading them again."""
    first = next(iter(tensors.values()))
    model = CausalLM(config, dtype=first.dtype, device="meta")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary.to_empty(device=first.device)  # its buffer is not in the state dict
    model.rotary.reset_inv_freq()
    return model.requires_grad_(False).eval()


def _weight_files(path: Path) -> dict[Path, set[str] | None]:
    """Weight files -> the tensor names the index assigns them (None when there is no index)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise CorruptCheckpointError(f"{index}: unreadable shard index ({e!r})") from e
        files: dict[Path, set[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(path / fname, set()).add(name)
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"{f}: shard listed in {index.name} not found")
        return dict(sorted(files.items()))
    single = path / SINGLE_FILE
    if single.is_file():
        return {single: None}
    hint = " (only safetensors are supported)" if any(path.glob("*.bin")) else ""
    raise MissingFileError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found{hint}")


def _expected_tensors(model: CausalLM, config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor name -> the destination view inside the model (fused params are sliced)."""
    c = config
    q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
    out = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
    }
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.decoder_layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        qkv = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, None)}
        if not c.owns_kv(i):  # MLKV: reads an earlier layer's KV, has no k/v of its own
            qkv = {"q_proj": slice(0, q)}
        for name, rows in qkv.items():
            out[p + f"self_attn.{name}.weight"] = attn.qkv_proj.weight[rows]
            if c.qkv_bias:
                out[p + f"self_attn.{name}.bias"] = attn.qkv_proj.bias[rows]
        out[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = attn.o_proj.bias
        if c.qk_norm:
            assert attn.q_norm is not None  # qk_norm configs have both norms
            out[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
            if attn.k_norm is not None:
                out[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
        out[p + "mlp.gate_proj.weight"] = mlp.gate_up_proj.weight[:inter]
        out[p + "mlp.up_proj.weight"] = mlp.gate_up_proj.weight[inter:]
        out[p + "mlp.down_proj.weight"] = mlp.down_proj.weight
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return out


@torch.no_grad()
def _load_weights(
    model: CausalLM,
    config: ModelConfig,
    files: dict[Path, set[str] | None],
    dtype: torch.dtype,
    slices: dict | None = None,  # name -> TensorSlice: read only that part (tensor parallel)
) -> None:
    slices = slices or {}
    expected = _expected_tensors(model, model.config)  # the model's own (a slice's) sizes
    # A tied checkpoint may still carry lm_head.weight; it must match but is not used.
    optional: dict[str, tuple[int, ...]] = (
        {"lm_head.weight": (config.vocab_size, config.hidden_size)} if model.lm_head is None else {}
    )
    optional.update(mlkv.unused_kv_tensors(config))  # an MLKV sharer's k/v: ignored
    loaded: dict[str, Path] = {}
    device = str(model.device)
    shards = tqdm(files.items(), desc="Loading shards", unit="shard", disable=len(files) < 2)
    for file, indexed in shards:
        try:
            handle = safe_open(str(file), framework="pt", device=device)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CorruptCheckpointError(f"{file}: unreadable safetensors file ({e})") from e
        with handle as f:
            names = set(f.keys())
            if indexed is not None and indexed - names:
                missing = ", ".join(sorted(indexed - names)[:5])
                raise CorruptCheckpointError(
                    f"{file}: tensors listed in {INDEX_FILE} are absent from the file: {missing}"
                )
            for name in sorted(names):
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name in loaded:
                    raise CorruptCheckpointError(
                        f"{file}: tensor {name} also appears in {loaded[name].name}"
                    )
                dest = expected.get(name)
                want = tuple(dest.shape) if dest is not None else optional.get(name)
                cut = slices.get(name) if dest is not None else None
                if cut is not None and want is not None:  # the checkpoint holds the whole
                    want = want[: cut.dim] + (cut.full,) + want[cut.dim + 1 :]
                if want is None:
                    raise CorruptCheckpointError(
                        f"{file}: unexpected tensor {name} for {config.architecture} "
                        f"with {config.num_layers} layers"
                    )
                try:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != want:
                        raise CorruptCheckpointError(
                            f"{file}: tensor {name} has shape {list(shape)}, "
                            f"config.json implies {list(want)}"
                        )
                    loaded[name] = file
                    if dest is None:
                        continue
                    part = f.get_tensor(name) if cut is None else f.get_slice(name)[cut.index]
                    dest.copy_(part.to(dtype))
                except CorruptCheckpointError:
                    raise
                except Exception as e:
                    raise CorruptCheckpointError(f"{file}: cannot read tensor {name} ({e})") from e
    absent = sorted(set(expected) - set(loaded))
    if absent:
        first = next(iter(files))
        where = str(first) if len(files) == 1 else f"{first.parent} ({len(files)} shards)"
        shown = ", ".join(absent[:8]) + (f" (+{len(absent) - 8} more)" if len(absent) > 8 else "")
        raise CorruptCheckpointError(f"{where}: missing tensors: {shown}")
