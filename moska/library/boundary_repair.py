"""Boundary repair of a position-independent library, at build time (CacheBlend/EPIC-style).

A position-independent library prefills every chunk alone (after its chunk sink), so the
first tokens of a chunk that continues a document never saw the text before them: their
KV is the most wrong of the chunk's (EPIC's "attention sink at every chunk start"). Repair
recomputes, for every chunk that continues a document, the KV of its first ``tokens``
tokens with the document's preceding tokens as context (at most one chunk of them: the
preceding chunk), and writes it over the chunk-alone KV in the first ``layers`` KV layers.

What one repaired row is, exactly: the model's forward over ``sink + context + target``
(the same attention path as the build, ``library/prefill.py``), with RoPE positions chosen
so that the target keeps the positions the library stores for it (``len(sink) + i``: the
context sits at the positions before, negative ones included; RoPE is relative, so this is
the joint encoding of the two chunks, rotated as the library stores its keys). The forward
runs every layer, so layers 1..L-1 of the target read hidden states that saw the context;
KV layers from ``layers`` on keep the chunk-alone KV (what ``bench/composition_quality.py``
measured as "repair m/L"). Layer 0's KV is a function of its token alone (the projection of
its embedding), so the repair first changes KV at ``layers`` = 2. No other row changes, the
library's layout does not change, and every request that composes the library shares the
repaired chunks: the repair costs one extra prefill of the context rows once, at build
time, and nothing per request (docs/architecture.md, at ``boundary_repair.py``, says why
moska repairs at build time rather than per request as CacheBlend does: the chunks stay
shared).

``BoundaryRepair(0, 0)`` (the default) is no repair: the build is bit-for-bit the plain one.
Measured through the engine: ``bench/composition_repair_engine.py`` (bench/results/README.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moska.library.errors import LibraryError

MAX_REPAIR_TOKENS = 1 << 20


class BoundaryRepairError(LibraryError):
    """A bad boundary repair setting. ``field`` names the build input to change
    (``repair_tokens``, ``repair_layers`` or ``mode``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _check_count(value: object, field: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise BoundaryRepairError(
            f"{field} must be an integer in [0, {upper}] (0: no repair), got {value!r}", field
        )
    return value


@dataclass(frozen=True)
class BoundaryRepair:
    """Recompute the first ``tokens`` tokens of every chunk that continues a document in the
    first ``layers`` KV layers (see the module docstring). Either 0: no repair."""

    tokens: int = 0
    layers: int = 0

    def __post_init__(self) -> None:
        _check_count(self.tokens, "repair_tokens", MAX_REPAIR_TOKENS)
        _check_count(self.layers, "repair_layers", 1 << 16)

    @property
    def active(self) -> bool:
        return self.tokens > 0 and self.layers > 0

    @classmethod
    def of(cls, value: BoundaryRepair | tuple[int, int] | None) -> BoundaryRepair:
        """``value`` as a BoundaryRepair: None is no repair, ``(tokens, layers)`` a pair."""
        if value is None:
            return NO_REPAIR
        if isinstance(value, BoundaryRepair):
            return value
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(value[0], value[1])
        raise BoundaryRepairError(
            f"boundary_repair must be BoundaryRepair(tokens, layers) or a (tokens, layers) "
            f"pair, got {value!r}",
            "boundary_repair",
        )


NO_REPAIR = BoundaryRepair()


def check_repair(value: Any, mode: str, num_kv_layers: int | None) -> BoundaryRepair:
    """The repair a build of ``mode`` runs, checked: only for position-independent libraries
    (a prefix library's chunks already see everything before them), at most the model's
    ``num_kv_layers`` layers (None: not checked). Raises ``BoundaryRepairError``."""
    repair = BoundaryRepair.of(value)
    if not repair.active:
        return repair
    if mode != "independent":
        raise BoundaryRepairError(
            "boundary repair is for position-independent libraries (a prefix library's "
            "chunks already see the text before them): build with mode independent, or "
            "leave repair_tokens and repair_layers out",
            "repair_tokens",
        )
    if num_kv_layers is not None and repair.layers > num_kv_layers:
        raise BoundaryRepairError(
            f"repair_layers must be at most the model's {num_kv_layers} KV layers, "
            f"got {repair.layers}",
            "repair_layers",
        )
    return repair


def repair_from_args(args: Any) -> BoundaryRepair | None:
    """The repair the CLI flags ask for (``--repair-tokens``, ``--repair-layers``); None when
    neither is given. One without the other is an error (each alone repairs nothing)."""
    tokens = getattr(args, "repair_tokens", None)
    layers = getattr(args, "repair_layers", None)
    if tokens is None and layers is None:
        return None
    if tokens is None or layers is None:
        missing = "--repair-layers" if layers is None else "--repair-tokens"
        raise BoundaryRepairError(
            f"boundary repair needs both --repair-tokens and --repair-layers: add {missing}",
            "repair_layers" if layers is None else "repair_tokens",
        )
    return BoundaryRepair(tokens, layers)


@dataclass(frozen=True)
class RepairTarget:
    """Rows ``start .. start + count - 1`` of the pools (a chunk's first tokens) are
    recomputed after rows ``context_start .. start - 1`` (the same document's)."""

    start: int
    count: int
    context_start: int


def repair_targets(chunks: Sequence[Any], tokens: int, context: int) -> list[RepairTarget]:
    """The chunks that continue a document (not a document's first chunk) and what each
    repairs: its first ``tokens`` rows after at most ``context`` rows before it. ``chunks``:
    the manifest's ``ChunkEntry`` rows (a chunk of unknown document is left alone)."""
    first: dict[int, int] = {}
    out = []
    for c in chunks:
        if c.document is None:
            continue
        doc_start = first.setdefault(c.document, c.start)
        if c.start == doc_start or tokens <= 0:
            continue
        count = min(tokens, c.end - c.start)
        out.append(RepairTarget(c.start, count, max(doc_start, c.start - context)))
    return out


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of consecutive sequences, grouped so that each group holds at most ``budget``
    tokens (a longer sequence alone): one group shares one cache and its forwards."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def repair_kv(
    model: Any,
    token_ids: Sequence[int],
    targets: Sequence[RepairTarget],
    k_pools: list[torch.Tensor],
    v_pools: list[torch.Tensor],
    layers: int,
    *,
    sink: Sequence[int] = (),
    sm_scale: float | None = None,
    prefill_tokens: int = 4096,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> float:
    """Overwrite ``targets``' rows of the first ``layers`` pools in place with their repaired
    KV (module docstring); return the seconds spent. Attention is the build's
    (``PagedAttention`` with the model's kernel table over a paged cache of its own), the
    forwards packed by ``prefill_tokens`` as the build's prefill. ``on_step()`` is called
    after each forward: a server's build raises from it to cancel."""
    from tqdm.auto import tqdm

    from moska.attention.backend import PagedAttention
    from moska.attention.kv_cache import PagedKVCache
    from moska.kernel_ops import kernel_ops
    from moska.library.chunking import plan_pieces
    from moska.library.prefill import BLOCK_SIZE, BuildLayout, _kv_heads_and_dtype, model_device

    if not targets or layers <= 0:
        return 0.0
    t0 = time.perf_counter()
    device = model_device(model)
    head_dim = int(k_pools[0].shape[-1])
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    ops = getattr(model, "kernels", None) or kernel_ops("torch")
    heads, dtype = _kv_heads_and_dtype(model)
    sink = [int(t) for t in sink]
    seqs = [
        sink + [int(t) for t in token_ids[t.context_start : t.start + t.count]] for t in targets
    ]
    groups = _batches([len(s) for s in seqs], max(prefill_tokens, max(len(s) for s in seqs)))
    blocks = max(sum(-(-len(seqs[i]) // BLOCK_SIZE) for i in g) for g in groups)
    cache = PagedKVCache(len(k_pools), blocks, BLOCK_SIZE, heads, head_dim, dtype, device)
    attention = PagedAttention(cache, ops, scale, overlap=False)
    flat = (-1, heads, head_dim)
    bar = tqdm(
        total=sum(len(s) for s in seqs),
        unit="tok",
        unit_scale=True,
        desc="boundary repair",
        disable=not progress,
        dynamic_ncols=True,
    )
    with torch.inference_mode(), bar:
        for group in groups:
            ids: list[int] = []
            spans, shift = [], {}
            for i in group:  # shift: the target's first row sits at position len(sink)
                shift[len(ids)] = targets[i].start - targets[i].context_start
                spans.append((len(ids), len(ids) + len(seqs[i])))
                ids += seqs[i]
            layout = BuildLayout.of(spans, BLOCK_SIZE)
            index = {start: j for j, (start, _) in enumerate(spans)}
            x = torch.tensor(ids, dtype=torch.int64, device=device)
            for segments in plan_pieces(spans, prefill_tokens):
                rows = torch.cat([torch.arange(s + lo, s + hi) for s, lo, hi in segments])
                pos = torch.cat([torch.arange(lo, hi) - shift[s] for s, lo, hi in segments])
                meta = layout.metadata(segments, index, device)
                model.forward(x[rows.to(device)], pos.to(device), attention.bind(meta))
                bar.update(len(rows))
                if on_step is not None:
                    on_step()
            for j, i in enumerate(group):
                t = targets[i]
                end = layout.first_block[j] * BLOCK_SIZE + len(seqs[i])
                src = torch.arange(end - t.count, end, device=device)
                for layer in range(min(layers, len(k_pools))):
                    k_pools[layer][t.start : t.start + t.count] = cache.k[layer].view(flat)[src]
                    v_pools[layer][t.start : t.start + t.count] = cache.v[layer].view(flat)[src]
    if device.type == "cuda":  # the build's stream only (a server's decode goes on)
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter() - t0
