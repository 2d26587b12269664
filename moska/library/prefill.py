"""Prefill a tokenized corpus into per-layer KV pools with the model's own forward.

The model calls ``attn(layer, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) -> o [T,Hq,D]`` per
layer; our callable stores k, v into the layer's pool and attends causally over every
row of the same sequence prefilled so far. Memory stays bounded by ``prefill_tokens``
tokens of activations per forward; the pools [S_total, Hkv, D] live on the model's device.

``on_progress(done, total)`` is called before the first piece and after each one: a server
shows it as the build's progress and stops a build (cancel, quota) by raising from it, so a
build stops at the next piece boundary with nothing written anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moska.library.chunking import TokenizedCorpus, plan_pieces

POOL_BLOCK = 64  # rows; pools are padded to a multiple so the paged kernel can view them

ProgressHook = Callable[[int, int], None]  # (tokens prefilled, total tokens); may raise


def causal_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [L, Hkv, D], L >= T; query j sits at position L - T + j
    v: torch.Tensor,  # [L, Hkv, D]
    sm_scale: float,
    key_block: int | None = None,
) -> torch.Tensor:  # [T, Hq, D] q.dtype
    """Causal GQA attention in fp32 over key blocks (online softmax); bounded memory."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    assert L >= T and Hq % Hkv == 0, (q.shape, k.shape)
    G = Hq // Hkv
    if key_block is None:  # keep the [T, Hq, block] fp32 scores under ~256 MiB
        key_block = max(64, (1 << 26) // max(1, T * Hq))
    qf = q.float().view(T, Hkv, G, D) * sm_scale
    qpos = torch.arange(L - T, L, device=q.device)  # [T]
    m = torch.full((T, Hkv, G), -math.inf, device=q.device)
    den = torch.zeros((T, Hkv, G), device=q.device)
    acc = torch.zeros((T, Hkv, G, D), device=q.device)
    for k0 in range(0, L, key_block):
        k1 = min(L, k0 + key_block)
        s = torch.einsum("thgd,bhd->thgb", qf, k[k0:k1].float())  # [T, Hkv, G, b]
        kpos = torch.arange(k0, k1, device=q.device)
        s = s.masked_fill((kpos[None, :] > qpos[:, None])[:, None, None, :], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new).nan_to_num(0.0)
        p = torch.exp(s - m_new[..., None]).nan_to_num(0.0)
        den = den * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("thgb,bhd->thgd", p, v[k0:k1].float())
        m = m_new
    return (acc / den[..., None]).view(T, Hq, D).to(q.dtype)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Square causal attention (T == L) with torch SDPA (flash on CUDA)."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return o.transpose(0, 1)


class _PoolAttention:
    """The ``attn`` callable of one forward: writes KV rows, attends causally per segment."""

    def __init__(
        self,
        pools: _Pools,
        segments: list[tuple[int, int, int]],
        sm_scale: float,
        kernel: Callable | None,
    ) -> None:
        self.pools, self.segments, self.sm_scale, self.kernel = pools, segments, sm_scale, kernel

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor:
        """layer: the KV slot; k/v None: an MLKV layer reading the rows its source wrote."""
        kp, vp = self.pools.get(layer, k)  # [S_pad, Hkv, D]
        o = torch.empty_like(q)
        t = 0
        for seq_start, lo, hi in self.segments:
            n = hi - lo
            if k is not None:
                assert v is not None  # a layer that writes KV brings both K and V
                kp[seq_start + lo : seq_start + hi] = k[t : t + n]
                vp[seq_start + lo : seq_start + hi] = v[t : t + n]
            o[t : t + n] = self._attend(q[t : t + n], kp, vp, seq_start, hi)
            t += n
        assert t == q.shape[0], (t, q.shape)
        return o

    def _attend(self, q, kp, vp, seq_start: int, hi: int) -> torch.Tensor:
        T = q.shape[0]
        if self.kernel is not None and seq_start % POOL_BLOCK == 0:
            nb = -(-hi // POOL_BLOCK)
            rows = slice(seq_start, seq_start + nb * POOL_BLOCK)
            shape = (nb, POOL_BLOCK) + tuple(kp.shape[1:])
            dev = q.device
            o, _ = self.kernel(
                q,
                kp[rows].view(shape),  # [nb, POOL_BLOCK, Hkv, D]
                vp[rows].view(shape),
                torch.arange(nb, dtype=torch.int32, device=dev)[None],  # [1, nb]
                torch.tensor([0, T], dtype=torch.int32, device=dev),  # cu_q_lens [2]
                torch.tensor([hi], dtype=torch.int32, device=dev),  # seq_lens [1]
                self.sm_scale,
            )
            return o
        keys, values = kp[seq_start : seq_start + hi], vp[seq_start : seq_start + hi]
        if T == hi:
            return _sdpa_causal(q, keys, values, self.sm_scale)
        return causal_attention_ref(q, keys, values, self.sm_scale)


class _Pools:
    """Per-KV-layer pools (one per source layer of an MLKV model), allocated on first use
    with the dtype/device of the model's k."""

    def __init__(self, num_layers: int, num_tokens: int) -> None:
        self.padded = -(-num_tokens // POOL_BLOCK) * POOL_BLOCK + POOL_BLOCK
        self.num_tokens = num_tokens
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def get(self, layer: int, like: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer], self.v[layer]
        if k is None or v is None:
            assert like is not None, f"KV slot {layer} read before its source layer wrote it"
            shape = (self.padded,) + tuple(like.shape[1:])  # [S_pad, Hkv, D]
            k = self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            v = self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return k, v

    def finish(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ks = [t for t in self.k if t is not None]
        vs = [t for t in self.v if t is not None]
        assert len(ks) == len(vs) == len(self.k), "the model skipped a layer"
        S = self.num_tokens
        return [t[:S] for t in ks], [t[:S] for t in vs]  # [S_total, Hkv, D] views


def model_device(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


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
    ``[S_total, Hkv, D]`` on the model's device in the model's KV dtype. An exception
    raised by ``on_progress`` stops the prefill and propagates (the pools are dropped).

    ``sequence_prefix`` (a position-independent library's ``chunk_sink``: the BOS) is
    prefilled in front of every sequence and its rows are dropped from the pools: each
    chunk's tokens then see the attention sink the model was trained with, and the library
    stores no copy of it (the request brings its own).

    On CUDA it waits on the current stream only, so a build on its own stream (the
    server's build worker) does not wait for the engine's decode steps."""
    from tqdm.auto import tqdm

    device = model_device(model)
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    # the engine's kernel table: its Triton paged prefill over the pools, else SDPA below
    ops = getattr(model, "kernels", None)
    kernel = ops.paged_prefill if ops is not None and ops.name == "triton" else None
    token_ids, sequences, keep = _with_prefix(corpus, list(sequence_prefix))
    pools = _Pools(num_layers, len(token_ids))
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
            model.forward(
                ids[rows.to(device)],
                positions.to(device),
                _PoolAttention(pools, segments, scale, kernel),
            )
            if stream is not None:
                stream.synchronize()
            bar.update(len(rows))
            done += len(rows)
            if on_progress is not None:
                on_progress(done, len(token_ids))
    seconds = time.perf_counter() - t0
    k_pools, v_pools = pools.finish()
    if keep is not None:  # drop the prefix rows: [S_total, Hkv, D]
        rows = keep.to(device)
        k_pools = [k.index_select(0, rows) for k in k_pools]
        v_pools = [v.index_select(0, rows) for v in v_pools]
    return k_pools, v_pools, seconds


def _with_prefix(
    corpus: TokenizedCorpus, prefix: list[int]
) -> tuple[list[int], list[tuple[int, int]], torch.Tensor | None]:
    """(token ids, sequences, rows to keep) of the corpus with ``prefix`` in front of every
    sequence; without a prefix the corpus as it is and None."""
    if not prefix:
        return corpus.token_ids, corpus.sequences, None
    ids: list[int] = []
    sequences, keep = [], []
    for start, end in corpus.sequences:
        base = len(ids)
        ids += prefix + corpus.token_ids[start:end]
        sequences.append((base, len(ids)))
        keep.append(torch.arange(base + len(prefix), len(ids)))
    return ids, sequences, torch.cat(keep)
