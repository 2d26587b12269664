"""Prefill a tokenized corpus into per-layer KV pools through the serving attention path.

A build runs the model's own forward with the engine's attention backend
(``attention/backend.py``'s ``PagedAttention``, with the model's kernel table) over a paged
KV cache of its own (``attention/kv_cache.py``): each sequence of the corpus (the whole
corpus in prefix mode, each chunk in independent mode, a chunk sink in front) owns a run of
consecutive blocks, and each forward piece is described by the same ``AttentionMetadata``
(slots, cumulative query lengths, sequence lengths, block tables) as a serving step's
chunked prefill. One attention implementation then serves both, and a library's KV is
what serving would have computed for the same tokens. The ``ModelRunner`` itself is not
reused: it is driven by the scheduler's requests and owns the engine's cache, sampler and
CUDA graphs, none of which a build has.

After the last piece the rows are compacted in place into the library's contiguous layout
``[S_total, Hkv, D]`` (block padding and chunk-sink rows dropped); the pools are views of
the build cache's per-layer planes: one allocation, freed with the last layer's pools,
that also holds each sequence's block padding and chunk-sink rows (at most
``BLOCK_SIZE - 1 + len(sink)`` rows per sequence: 0.4 % at the default 4096-token chunks;
a library the manager places in its arena is copied out of it). Activations stay bounded
by ``prefill_tokens`` tokens per forward; the PyTorch table's attention reference holds a
piece's [Hq, q_len, seq_len] fp32 scores, so a CPU build of a long prefix library wants a
small ``prefill_tokens``.

``on_progress(done, total)`` is called before the first piece and after each one: a server
shows it as the build's progress and stops a build (cancel, quota) by raising from it, so a
build stops at the next piece boundary with nothing written anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moska.attention.metadata import AttentionMetadata
from moska.library.chunking import TokenizedCorpus, plan_pieces

if TYPE_CHECKING:
    from moska.kernel_ops import KernelOps

BLOCK_SIZE = 16  # rows per block of the build's cache: the engine's default block size
COMPACT_ROWS = 1 << 16  # rows moved per copy when the pools are compacted (bounds a temporary)

ProgressHook = Callable[[int, int], None]  # (tokens prefilled, total tokens); may raise


@dataclass(frozen=True)
class BuildLayout:
    """Where the prefilled sequences live in the build's paged cache: sequence i (rows
    ``sequences[i]`` of the prefilled token ids) owns blocks ``first_block[i] ..
    first_block[i] + ceil(len_i / block_size) - 1``, its rows in order."""

    sequences: tuple[tuple[int, int], ...]  # (start, end) rows of the prefilled ids
    first_block: tuple[int, ...]
    num_blocks: int
    block_size: int

    @classmethod
    def of(cls, sequences: Sequence[tuple[int, int]], block_size: int) -> BuildLayout:
        first, n = [], 0
        for start, end in sequences:
            first.append(n)
            n += -(-(end - start) // block_size)
        return cls(tuple(sequences), tuple(first), n, block_size)

    def metadata(
        self, segments: list[tuple[int, int, int]], index: dict[int, int], device: torch.device
    ) -> AttentionMetadata:
        """The step metadata of one forward piece: segment ``(seq_start, lo, hi)`` writes
        positions ``lo..hi-1`` of its sequence and attends to ``0..hi-1`` of it."""
        bs = self.block_size
        slots: list[int] = []
        cu_q, seq_lens, tables = [0], [], []
        for seq_start, lo, hi in segments:
            first = self.first_block[index[seq_start]]
            slots.extend(range(first * bs + lo, first * bs + hi))
            cu_q.append(cu_q[-1] + hi - lo)
            seq_lens.append(hi)
            tables.append(list(range(first, first + -(-hi // bs))))
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            cu_q_lens=torch.tensor(cu_q, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            decode_only=False,
        )

    def kept_rows(self, skip: int) -> torch.Tensor:  # [S] int64, increasing
        """Cache rows of every sequence's tokens after its first ``skip`` (the chunk sink)."""
        rows = [
            torch.arange(first * self.block_size + skip, first * self.block_size + end - start)
            for first, (start, end) in zip(self.first_block, self.sequences)
        ]
        return torch.cat(rows)


def compact_rows(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``flat[keep]`` computed in place into ``flat[:len(keep)]`` and returned as that view.
    ``keep`` increases with ``keep[i] >= i``, so copying in increasing blocks of rows never
    overwrites a row a later block still reads; the temporary is one block."""
    n = keep.numel()
    if torch.equal(keep, torch.arange(n, device=keep.device)):
        return flat[:n]
    for a in range(0, n, COMPACT_ROWS):
        b = min(n, a + COMPACT_ROWS)
        flat[a:b] = flat.index_select(0, keep[a:b])
    return flat[:n]


def _first_parameter(model: Any) -> torch.Tensor | None:
    return next(iter(model.parameters()), None) if hasattr(model, "parameters") else None


def model_device(model: Any) -> torch.device:
    p = _first_parameter(model)
    return p.device if p is not None else torch.device("cpu")


def _kv_heads_and_dtype(model: Any) -> tuple[int, torch.dtype]:
    """The KV heads of the model's config (this rank's under tensor parallelism) and the
    dtype its k/v projections give: its parameters'."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_kv_heads", None) or getattr(config, "num_key_value_heads", None)
    if heads is None:
        raise AttributeError("the model's config names no num_kv_heads")
    p = _first_parameter(model)
    return int(heads), p.dtype if p is not None else torch.float32


def prefill_corpus(
    model: Any,
    corpus: TokenizedCorpus,
    num_layers: int,
    head_dim: int,
    prefill_tokens: int = 4096,
    progress: bool = True,
    sm_scale: float | None = None,
    on_progress: ProgressHook | None = None,
    sequence_prefix: Sequence[int] = (),
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Run the model over the corpus; return (k_pools, v_pools, seconds), pools per KV
    layer (``num_layers``: the model's KV layers, fewer than its layers under MLKV)
    ``[S_total, Hkv, D]`` on the model's device in the model's dtype. An exception
    raised by ``on_progress`` stops the prefill and propagates (the pools are dropped).

    ``sequence_prefix`` (a position-independent library's ``chunk_sink``: the BOS) is
    prefilled in front of every sequence and its rows are dropped from the pools: each
    chunk's tokens then see the attention sink the model was trained with, and the library
    stores no copy of it (the request brings its own).

    Attention is the serving backend's with the model's kernel table (``model.kernels``,
    which the engine's runner sets; the PyTorch table otherwise). On CUDA it waits on the
    current stream only, so a build on its own stream (the server's build worker) does not
    wait for the engine's decode steps."""
    from tqdm.auto import tqdm

    # imported here: the backend imports library modules (composition, positions)
    from moska.attention.backend import PagedAttention
    from moska.attention.kv_cache import PagedKVCache
    from moska.kernel_ops import kernel_ops

    device = model_device(model)
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    ops: KernelOps = getattr(model, "kernels", None) or kernel_ops("torch")
    token_ids, sequences = _with_prefix(corpus, list(sequence_prefix))
    layout = BuildLayout.of(sequences, BLOCK_SIZE)
    heads, dtype = _kv_heads_and_dtype(model)
    cache = PagedKVCache(num_layers, layout.num_blocks, BLOCK_SIZE, heads, head_dim, dtype, device)
    attention = PagedAttention(cache, ops, scale, overlap=False)
    index = {start: i for i, (start, _) in enumerate(sequences)}
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)  # [S_total + prefixes]
    bar = tqdm(
        total=len(token_ids),
        unit="tok",
        unit_scale=True,
        desc="prefill",
        disable=not progress,
        dynamic_ncols=True,
    )
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if stream is not None:
        stream.synchronize()
    done = 0
    if on_progress is not None:
        on_progress(done, len(token_ids))
    t0 = time.perf_counter()
    with torch.inference_mode(), bar:
        for segments in plan_pieces(sequences, prefill_tokens):
            rows = torch.cat([torch.arange(s + lo, s + hi) for s, lo, hi in segments])
            positions = torch.cat([torch.arange(lo, hi) for _, lo, hi in segments])
            meta = layout.metadata(segments, index, device)
            model.forward(ids[rows.to(device)], positions.to(device), attention.bind(meta))
            if stream is not None:
                stream.synchronize()
            bar.update(len(rows))
            done += len(rows)
            if on_progress is not None:
                on_progress(done, len(token_ids))
        seconds = time.perf_counter() - t0
        keep = layout.kept_rows(len(sequence_prefix)).to(device)  # [S_total]
        assert keep.numel() == corpus.num_tokens, (keep.numel(), corpus.num_tokens)
        flat = (-1, heads, head_dim)
        k_pools = [compact_rows(cache.k[i].view(flat), keep) for i in range(num_layers)]
        v_pools = [compact_rows(cache.v[i].view(flat), keep) for i in range(num_layers)]
    return k_pools, v_pools, seconds


def _with_prefix(
    corpus: TokenizedCorpus, prefix: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, sequences) of the corpus with ``prefix`` in front of every sequence."""
    if not prefix:
        return corpus.token_ids, corpus.sequences
    ids: list[int] = []
    sequences = []
    for start, end in corpus.sequences:
        base = len(ids)
        ids += prefix + corpus.token_ids[start:end]
        sequences.append((base, len(ids)))
    return ids, sequences
