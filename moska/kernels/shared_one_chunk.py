"""One shared chunk read by every KV head of B requests (a shared prefix, a system prompt),
on the fastest backend for the shape: our grouped kernel, torch's SDPA (cuDNN / flash), or
on Hopper the Gluon ping-pong kernel (`gluon_one_chunk.py`; D 128 at G 4 / 8 from 4,096 /
8,192 rows, 2 % faster than cuDNN by the median of 16 paired rounds, session 18).

This is the grouped kernel's case with one group per KV head (B * G query rows against one
chunk): no routing, so the dense attention libraries can run it as one packed attention
per KV head ([1, Hkv, B * G, D] queries against the chunk's K/V as a strided view of the
pool, no copy). At many rows the problem is compute-bound and cuDNN's Hopper kernel runs
closer to the matmul peak than our Triton tile at some shapes (H200, D = 128: 2,048 rows at
G = 2 or 8 in 1.64 ms where ours takes 1.84-1.98, issue 22); at few rows ours is faster
(split-KV fills the GPU where one packed cuDNN launch cannot: cuDNN takes ~1.5 ms at any B
up to 1,024 rows). Rather than lose to a library we can call, the
launcher takes the backend from `shared_tuning.one_chunk_backend` (measured per head dim,
GQA ratio and rows per KV head by `python -m moska.bench.kernels_one_chunk`).

Output layout is the grouped kernel's for the selections `one_chunk_selections` makes
(sorted by (chunk 0, kv_head, req)): o [Hkv * B, G, D] (row h * B + r is KV head h of
request r), lse [Hkv * B, G] fp32 (natural log), so either backend's result feeds the
same LSE merge. SDPA backends need fp16/bf16 on CUDA (the CPU's flash kernel serves the
tests); fp32 inputs take the Triton path.
"""

import functools
import os
from types import ModuleType

import torch
import triton

from .selections import Selections
from .shared_attention import grouped_shared_attention
from .shared_tuning import GLUON_ONE_CHUNK, ONE_CHUNK_BACKENDS, one_chunk_backend

__all__ = ["one_chunk_attention", "one_chunk_selections", "one_chunk_states", "sdpa_one_chunk"]


def one_chunk_selections(b: int, hkv: int, device: torch.device | str) -> Selections:
    """Every KV head of requests 0..b-1 reads chunk 0, sorted by (chunk, kv_head, req), with
    the (req, kv_head) grouping the LSE merge reads (`row_order`: selection h * b + r is the
    one segment of (r, h); so the merge needs no sort). Made by device ops only (arange /
    repeat): capturable in a CUDA graph."""
    kv = torch.arange(hkv, device=device, dtype=torch.int32).repeat_interleave(b)
    req = torch.arange(b, device=device, dtype=torch.int32).repeat(hkv)
    order = (kv * b + req).view(hkv, b).t().reshape(-1)  # by (req, kv_head)
    offsets = torch.arange(b * hkv + 1, device=device, dtype=torch.int32)
    return Selections(req, kv, torch.zeros_like(req), order, offsets)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"q must be [B, Hq, D] and k, v [S, Hkv, D] of one shape; got q {tuple(q.shape)},"
            f" k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, d = q.shape
    s, hkv, dk = k.shape
    if dk != d or hq % hkv:
        raise ValueError(f"head dims {d} / {dk} differ or Hq {hq} is not a multiple of Hkv {hkv}")
    if s == 0:
        raise ValueError("the chunk has no keys: pass at least one key row")
    return b, hkv, hq // hkv, d


def sdpa_one_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-chunk attention through torch's SDPA `backend` ("cudnn" or "flash"), with its
    log-sum-exp: (o [Hkv * B, G, D] q.dtype, lse [Hkv * B, G] fp32). One packed copy of q
    (B * Hq * D elements) in, one of o out; K/V are read in place."""
    b, hkv, g, d = _check(q, k, v)
    qp = q.view(b, hkv, g, d).transpose(0, 1).reshape(1, hkv, b * g, d)
    kt, vt = k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2)  # [1, Hkv, S, D]
    if backend == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qp, kt, vt, None, True, 0.0, False, False, scale=sm_scale
        )
    elif backend == "flash" and q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            qp, kt, vt, 0.0, False, False, scale=sm_scale
        )
    elif backend == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kt, vt, 0.0, False, scale=sm_scale
        )
    else:
        raise ValueError(f"unknown SDPA backend {backend!r}; use 'cudnn' or 'flash'")
    o, lse = res[0], res[1]
    # lse is [1, Hkv, rows] (or [..., 1]; some builds pad rows): keep the first b * g
    lse = lse.reshape(hkv, -1)[:, : b * g].float()
    return o.reshape(hkv * b, g, d), lse.reshape(hkv * b, g)


_MAX_CACHED = 256  # distinct shapes kept; a longer tail of shapes rebuilds per call


class _Capped(dict):
    """A cache that keeps its first `_MAX_CACHED` entries and never drops one: a CUDA graph
    captured with a cached tensor reads it at every replay (clearing the cache would free
    memory a graph still reads)."""

    def __setitem__(self, key, value) -> None:
        if key in self or len(self) < _MAX_CACHED:
            super().__setitem__(key, value)


_INPUTS: dict[tuple, tuple[torch.Tensor, Selections]] = _Capped()  # offs, sel per shape
_PLANS: dict = _Capped()  # the grouped kernel's work lists of those inputs


def _inputs(b: int, hkv: int, s: int, device: torch.device, cache: bool):
    """The chunk table [0, S] and the selections: device ops only (no H2D copy, capturable),
    kept per shape when `cache` (outside a CUDA graph capture: its tensors live there)."""
    key = (device, b, hkv, s)
    if key in _INPUTS:
        return _INPUTS[key]
    offs = torch.arange(0, 2 * s, s, device=device, dtype=torch.int32)  # [0, S]
    made = (offs, one_chunk_selections(b, hkv, device))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cache and not capturing:
        _INPUTS[key] = made
    return made


def one_chunk_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [S, Hkv, D]: the chunk's rows (e.g. a slice of the pool)
    v: torch.Tensor,  # [S, Hkv, D]
    sm_scale: float,
    *,
    backend: str | None = None,
    cache_plan: bool = True,
    **tuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query head of B requests over one chunk: (o [Hkv * B, G, D], lse
    [Hkv * B, G] fp32), laid out as `grouped_shared_attention` lays out
    `one_chunk_selections(B, Hkv)`. `backend`: "triton", "cudnn" or "flash"; None: the tuning
    table's choice for (D, G, B * G rows per KV head, dtype, device); "gluon" (the Gluon
    ping-pong kernel, `gluon_one_chunk.py`) runs on Hopper only, the Triton path elsewhere.
    The Triton path's inputs
    and work list depend only on the sizes: with `cache_plan` they are built once per shape
    and tile (the two planning launches and the table's and selections' small launches are
    skipped after the first call; ~6-10 us of a 90-150 us call at B = 16, H200); `tuning`:
    tile overrides for it (for "gluon": `gluon_one_chunk`'s keywords)."""
    b, hkv, g, d = _check(q, k, v)
    if backend is None:
        backend = one_chunk_backend(d, g, b * g, q.dtype, q.device.type)
    if backend not in ONE_CHUNK_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {ONE_CHUNK_BACKENDS}")
    if backend == "gluon":  # Hopper only; elsewhere cuDNN (16-bit CUDA inputs) or Triton
        kernel = gluon_module()
        if kernel is not None and kernel.gluon_ok(q, k, v):
            return kernel.gluon_one_chunk(q, k, v, sm_scale, **(GLUON_ONE_CHUNK | tuning))
        sdpa = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
        backend = "cudnn" if sdpa else "triton"
    if backend != "triton":
        return sdpa_one_chunk(q, k, v, sm_scale, backend)
    s = k.shape[0]
    offs, sel = _inputs(b, hkv, s, q.device, cache_plan)
    plans = _PLANS if cache_plan else None
    return grouped_shared_attention(
        q, k, v, offs, sel, sm_scale, plans=plans, plan_key=("one_chunk", s), **tuning
    )


GLUON_TRITON = ("3.6.",)  # the Triton releases the Gluon kernel was compiled and timed with


@functools.cache
def gluon_module() -> ModuleType | None:
    """The Gluon kernel's module where the dispatcher may use it, else None (its points then
    run cuDNN or Triton). Gluon is Triton's experimental dialect and its API moves between
    releases, so only a Triton in `GLUON_TRITON` takes it by default; MOSKA_GLUON=0 turns
    it off, MOSKA_GLUON=1 tries it on any Triton that can import it."""
    flag = os.environ.get("MOSKA_GLUON", "")
    if flag == "0" or (flag != "1" and not triton.__version__.startswith(GLUON_TRITON)):
        return None
    try:
        from . import gluon_one_chunk
    except (ImportError, AttributeError):  # a Triton without (this form of) Gluon
        return None
    return gluon_one_chunk


def one_chunk_states(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, **kw
) -> tuple[torch.Tensor, torch.Tensor, Selections]:
    """`one_chunk_attention` and the selections its output is laid out by (kept per shape,
    like the Triton path's inputs): what a caller that merges by LSE needs, e.g. the engine's
    shared attention over a one-chunk library (moska/attention/shared.py)."""
    b, hkv, _, _ = _check(q, k, v)
    _, sel = _inputs(b, hkv, k.shape[0], q.device, kw.get("cache_plan", True))
    o, lse = one_chunk_attention(q, k, v, sm_scale, **kw)
    return o, lse, sel
