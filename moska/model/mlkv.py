"""MLKV (multi-layer KV sharing): which layer's KV each layer attends to.

An MLKV model has KV projections only in some layers (the *source* layers); every other
layer attends to the keys and values its source layer wrote earlier in the same forward,
so the KV cache holds one entry per source layer instead of one per layer.

moska's format, in config.json: ``"kv_source_layers": [0, 0, 2, 2]`` — layer ``i`` reads the
KV of layer ``kv_source_layers[i]``; a source reads its own (``s[i] == i``) and a sharing
layer reads an earlier source (``s[i] < i`` and ``s[s[i]] == s[i]``). Two other spellings
are read and turned into that list:

- MLKV's own (pythia-mlkv): ``"num_key_value_layers": m`` — the KV layers are
  ``0, int(1 * L / m), ..., int((m - 1) * L / m)`` and each other layer reads the closest
  KV layer before it;
- vLLM's ``kv_sharing_target_layer_name``: per layer, the name of the layer whose KV it
  reads (``"model.layers.0.self_attn.attn"``) or null, as a list of ``num_hidden_layers``
  entries or an object keyed by layer name or index.

In the model, KV lives in *slots*: slot ``j`` is the ``j``-th source layer, and layer ``i``
reads slot ``kv_slots[i]``. Caches and library pools are indexed by slot.
"""

from __future__ import annotations

import re
from typing import Any

from moska.model.errors import ModelLoadError

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def validate_sources(sources: tuple[int, ...], num_layers: int) -> None:
    """ModelLoadError unless ``sources`` is a valid layer -> source-layer map."""
    if len(sources) != num_layers:
        raise ModelLoadError(
            f"config.json: kv_source_layers has {len(sources)} entries, "
            f"num_hidden_layers is {num_layers}: give one source layer per layer"
        )
    for i, s in enumerate(sources):
        if not isinstance(s, int) or not 0 <= s <= i:
            raise ModelLoadError(
                f"config.json: kv_source_layers[{i}] = {s!r}: a layer reads its own KV or "
                f"that of an earlier layer (an int in [0, {i}])"
            )
        if sources[s] != s:
            raise ModelLoadError(
                f"config.json: kv_source_layers[{i}] = {s}, but layer {s} itself reads layer "
                f"{sources[s]}: point layer {i} at {sources[s]} (a source owns its KV)"
            )


def parse_sources(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The ``kv_source_layers`` of an HF config dict in any of the three spellings; ()
    when the model shares no KV across layers. Two spellings that disagree are refused."""
    found: dict[str, tuple[int, ...]] = {}
    if raw.get("kv_source_layers") is not None:
        value = raw["kv_source_layers"]
        if not isinstance(value, list | tuple):
            raise ModelLoadError("config.json: kv_source_layers must be a list of layer indices")
        found["kv_source_layers"] = tuple(value)
    if raw.get("num_key_value_layers") is not None:
        found["num_key_value_layers"] = _from_mlkv(raw["num_key_value_layers"], num_layers)
    if raw.get("kv_sharing_target_layer_name") is not None:
        found["kv_sharing_target_layer_name"] = _from_vllm(
            raw["kv_sharing_target_layer_name"], num_layers
        )
    for sources in found.values():
        validate_sources(sources, num_layers)
    distinct = set(found.values())
    if len(distinct) > 1:
        raise ModelLoadError(
            f"config.json: {' and '.join(found)} describe different KV sharing; keep one"
        )
    sources = distinct.pop() if distinct else ()
    return () if sources == tuple(range(num_layers)) else sources


def _from_mlkv(m: Any, num_layers: int) -> tuple[int, ...]:
    if not isinstance(m, int) or not 1 <= m <= num_layers:
        raise ModelLoadError(
            f"config.json: num_key_value_layers must be an int in [1, {num_layers}], got {m!r}"
        )
    kv_layers = [0] + [int((i + 1) * (num_layers / m)) for i in range(m - 1)]
    return tuple(max(j for j in kv_layers if j <= i) for i in range(num_layers))


def _layer_index(name: Any, what: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    if isinstance(name, str):
        if name.isdigit():
            return int(name)
        match = _LAYER_NAME.search(name)
        if match:
            return int(match.group(1))
    raise ModelLoadError(
        f"config.json: kv_sharing_target_layer_name: {what} {name!r} names no layer "
        "(expected e.g. 'model.layers.3.self_attn.attn' or a layer index)"
    )


def _from_vllm(value: Any, num_layers: int) -> tuple[int, ...]:
    sources = list(range(num_layers))
    if isinstance(value, list | tuple):
        items = list(enumerate(value))
    elif isinstance(value, dict):
        items = [(_layer_index(k, "layer"), v) for k, v in value.items()]
    else:
        raise ModelLoadError(
            "config.json: kv_sharing_target_layer_name must be a list (one entry per layer) "
            "or an object mapping layer names to target layer names"
        )
    for layer, target in items:
        if not 0 <= layer < num_layers:
            raise ModelLoadError(
                f"config.json: kv_sharing_target_layer_name names layer {layer}, "
                f"the model has {num_layers}"
            )
        if target is not None:
            sources[layer] = _layer_index(target, "target")
    return tuple(sources)


def kv_layers(sources: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The source layers (those with KV), ascending: slot j is kv_layers[j]."""
    return tuple(sorted(set(sources))) if sources else tuple(range(num_layers))


def kv_slots(sources: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Layer i -> the KV slot it reads (and, in a source layer, writes)."""
    slot_of = {layer: j for j, layer in enumerate(kv_layers(sources, num_layers))}
    return tuple(slot_of[s] for s in (sources or range(num_layers)))


def share_groups(num_layers: int, share: int) -> tuple[int, ...]:
    """kv_source_layers for groups of ``share`` consecutive layers reading the first of the
    group (the last group may be shorter)."""
    if share < 1:
        raise ValueError(f"share must be >= 1, got {share}")
    return tuple(i - i % share for i in range(num_layers))


def unused_kv_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the k/v tensors a sharing layer may still carry (a
    checkpoint marked MLKV without having been converted): the loader checks and ignores
    them, since the layer reads its source layer's KV."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_layers):
        if config.owns_kv(i):
            continue
        p = f"model.layers.{i}.self_attn."
        for name in ("k_proj", "v_proj"):
            out[p + name + ".weight"] = (config.kv_size, config.hidden_size)
            if config.qkv_bias:
                out[p + name + ".bias"] = (config.kv_size,)
        if config.qk_norm:
            out[p + "k_norm.weight"] = (config.head_dim,)
    return out
