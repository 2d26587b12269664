"""Build a library: documents -> tokens -> prefill KV -> routing index -> (disk).

``build_in_memory`` / ``build_from_corpus`` return a ``LoadedLibrary`` without touching
disk (benchmarks use them with random tokens); ``build_library`` also saves it atomically.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moska.library.boundary_repair import BoundaryRepair, check_repair, repair_kv, repair_targets
from moska.library.chunking import TokenizedCorpus, tokenize_documents
from moska.library.errors import LibraryError, LibraryExistsError
from moska.library.format import BUILD_KV_DTYPES, Manifest, model_fingerprint, validate_name
from moska.library.info import BuildStats, LibraryInfo
from moska.library.loaded import LoadedLibrary
from moska.library.positions import (
    IndependentOptions,
    check_fits_context,
    chunk_sink_ids,
    independent_options,
    model_max_positions,
)
from moska.library.prefill import ProgressHook, prefill_corpus

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_PREFILL_TOKENS = 4096


def _cfg(config: Any, *names: str) -> Any:
    for n in names:
        if getattr(config, n, None) is not None:
            return getattr(config, n)
    raise AttributeError(f"model config has none of {names}")


def build_from_corpus(
    loaded_model: Any,
    corpus: TokenizedCorpus,
    name: str,
    *,
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    routing_rank: int | None = None,
    progress: bool = True,
    on_progress: ProgressHook | None = None,
    independent: IndependentOptions | None = None,
    kv_dtype: str = "auto",
    boundary_repair: BoundaryRepair | tuple[int, int] | None = None,
) -> tuple[LoadedLibrary, BuildStats]:
    """Prefill ``corpus`` with the model and build each layer's routing index, in memory
    on the model's device. ``on_progress(done, total)`` sees the prefill's progress and
    may raise to stop the build (see ``prefill_corpus``). A library that does not fit the
    model's context is refused first (``positions.check_fits_context``). ``independent``:
    a position-independent library's chunk sink and APE tempering (None: the measured
    defaults, ``positions.DEFAULT_INDEPENDENT``).
    ``kv_dtype`` "fp8": the pools are stored in e4m3 with per-(token, KV head) scales
    (``library/fp8.py``), quantized after the routing index is built from the exact keys;
    "fp8_rotated": K Hadamard-rotated and K, V scales per 128-row block
    (``library/fp8_rotated.py``; the manifest says kv_dtype "fp8", fp8_format "rotated").
    ``boundary_repair``: ``BoundaryRepair(tokens, layers)`` (or the pair) recomputes the first
    tokens of every chunk that continues a document after the chunk before it, in the first
    layers, before the routing index is built (``library/boundary_repair.py``; independent
    mode only; None or 0: none)."""
    from moska.kernels.router import build_routing_index
    from moska.library.fp8_rotated import build_format, check_build, q_rotation_for, quantize_pair

    validate_name(name)
    if kv_dtype not in BUILD_KV_DTYPES:
        raise LibraryError(
            f"kv_dtype must be one of {BUILD_KV_DTYPES} (auto: the model's dtype), got {kv_dtype!r}"
        )
    kv_dtype, fp8_format = build_format(kv_dtype)
    config = loaded_model.config
    # one pool per layer that owns KV (an MLKV model's sharing layers read their source's)
    num_layers = int(_cfg(config, "num_kv_layers", "num_layers", "num_hidden_layers"))
    head_dim = int(_cfg(config, "head_dim"))
    sm_scale = getattr(config, "sm_scale", None)
    check_build(fp8_format, head_dim)
    if routing_rank is not None and not 1 <= routing_rank <= head_dim:
        raise LibraryError(f"routing_rank must be in [1, head_dim={head_dim}], got {routing_rank}")
    opts = independent_options(corpus.mode, independent)
    repair = check_repair(boundary_repair, corpus.mode, num_layers)
    sink = chunk_sink_ids(loaded_model, corpus.mode, opts.chunk_sink)
    check_fits_context(
        corpus.mode, corpus.num_tokens, corpus.chunk_size, model_max_positions(config), len(sink)
    )
    t0 = time.perf_counter()
    k_pools, v_pools, prefill_s = prefill_corpus(
        loaded_model.model,
        corpus,
        num_layers,
        head_dim,
        prefill_tokens,
        progress,
        sm_scale,
        on_progress,
        sink,
    )
    if repair.active:  # the preceding chunk is the context; the cancel hook still applies
        last = len(corpus.token_ids) + len(sink) * len(corpus.sequences)
        prefill_s += repair_kv(
            loaded_model.model,
            corpus.token_ids,
            repair_targets(corpus.chunks, repair.tokens, corpus.chunk_size),
            k_pools,
            v_pools,
            repair.layers,
            sink=sink,
            sm_scale=sm_scale,
            prefill_tokens=prefill_tokens,
            progress=progress,
            on_step=None if on_progress is None else lambda: on_progress(last, last),
        )
    t1 = time.perf_counter()
    device = k_pools[0].device
    offsets = torch.tensor(corpus.chunk_offsets, dtype=torch.int32, device=device)  # [C+1]
    with torch.inference_mode():
        routing = [build_routing_index(k, offsets, routing_rank) for k in k_pools]
        scales = None
        if kv_dtype == "fp8":  # the exact pools share the build cache, freed with the last
            scales = []
            for i in range(len(k_pools)):
                k_pools[i], v_pools[i], pair = quantize_pair(
                    k_pools[i], v_pools[i], offsets, fp8_format
                )
                scales.append(pair)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    stats = BuildStats(corpus.num_tokens, t2 - t0, prefill_s, t2 - t1)
    manifest = Manifest(
        name=name,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=model_fingerprint(loaded_model),
        mode=corpus.mode,
        chunk_size=corpus.chunk_size,
        num_tokens=corpus.num_tokens,
        position_offset=corpus.position_offset + len(sink),
        begins_with_bos=corpus.begins_with_bos,
        chunks=corpus.chunks,
        documents=corpus.documents,
        routing_rank=int(routing[0].basis.shape[-1]),
        files={},
        build=stats.to_dict(),
        build_id=uuid.uuid4().hex,
        chunk_sink=bool(sink),
        attention_temperature=opts.temperature,
        attention_log_scale=opts.log_scale,
        kv_dtype=kv_dtype,
        repair_tokens=repair.tokens if repair.active else 0,
        repair_layers=repair.layers if repair.active else 0,
        fp8_format=fp8_format,
    )
    token_ids = torch.tensor(corpus.token_ids, dtype=torch.int32)  # [S_total]
    library = LoadedLibrary(
        manifest, offsets, k_pools, v_pools, routing, token_ids, kv_scale_pools=scales
    )
    library.q_rotation = q_rotation_for(manifest, device)
    return library, stats


def build_in_memory(
    loaded_model: Any,
    documents: Sequence[tuple[str, str | Sequence[int]]],
    name: str,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    mode: str = "prefix",
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    routing_rank: int | None = None,
    progress: bool = True,
    on_progress: ProgressHook | None = None,
    independent: IndependentOptions | None = None,
    kv_dtype: str = "auto",
    boundary_repair: BoundaryRepair | tuple[int, int] | None = None,
) -> tuple[LoadedLibrary, BuildStats]:
    """Tokenize ``(name, text)`` documents (``(name, token_ids)`` ones are taken verbatim)
    and build the library in memory. ``chunk_size`` None: a size that scales with the
    library (``routing.policy.default_chunk_size``; what the manager, the CLI and the HTTP
    API use when none is given)."""
    corpus = tokenize_documents(loaded_model.tokenizer, documents, mode, chunk_size)
    return build_from_corpus(
        loaded_model,
        corpus,
        name,
        prefill_tokens=prefill_tokens,
        routing_rank=routing_rank,
        progress=progress,
        on_progress=on_progress,
        independent=independent,
        kv_dtype=kv_dtype,
        boundary_repair=boundary_repair,
    )


def build_library(
    loaded_model: Any,
    documents: Sequence[tuple[str, str | Sequence[int]]],
    name: str,
    root: str | os.PathLike,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    mode: str = "prefix",
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    routing_rank: int | None = None,
    progress: bool = True,
    kv_dtype: str = "auto",
) -> LibraryInfo:
    """Build the library and write it to ``<root>/<name>/`` atomically."""
    info, _ = build_and_save(
        loaded_model,
        documents,
        name,
        root,
        chunk_size=chunk_size,
        mode=mode,
        prefill_tokens=prefill_tokens,
        routing_rank=routing_rank,
        progress=progress,
        kv_dtype=kv_dtype,
    )
    return info


def build_and_save(
    loaded_model: Any,
    documents: Sequence[tuple[str, str | Sequence[int]]],
    name: str,
    root: str | os.PathLike,
    **kwargs: Any,
) -> tuple[LibraryInfo, LoadedLibrary]:
    """``build_library`` that also returns the in-memory library (the manager keeps it)."""
    from moska.library.store import save_library

    root = Path(root)
    if (root / validate_name(name)).exists():  # fail before spending the prefill
        raise LibraryExistsError(name, root)
    library, stats = build_in_memory(loaded_model, documents, name, **kwargs)
    t0 = time.perf_counter()
    library.manifest = save_library(library, root, kwargs.get("progress", True))
    save_s = time.perf_counter() - t0
    stats = BuildStats(
        stats.num_tokens,
        stats.seconds + save_s,
        stats.prefill_seconds,
        stats.routing_seconds,
        save_s,
    )
    info = LibraryInfo.from_manifest(library.manifest, root / name, library.manifest.model, stats)
    return info, library
