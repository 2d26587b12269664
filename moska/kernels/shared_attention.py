"""Grouped shared-chunk attention: the MoSKA kernel.

Every selection i = (req, kv_head, chunk) asks for the attention of the G query heads of
KV head `kv_head` of request `req` over the keys of chunk `chunk` (no mask). Selections are
sorted by (chunk, kv_head, req), so the selections of one (chunk, kv_head) pair, a *group*,
are contiguous and their query rows are rows `start*G : (start+n)*G` of the flat output
[N*G, D]. A group's rows are cut into tiles of BLOCK_M rows (a tile may end inside a
request when G does not divide BLOCK_M: rows are independent), so one K/V block read from
the chunk serves BLOCK_M query rows through a matrix product, as a fused MoE kernel serves
an expert's token tile.

One launch runs over a work list of items (group, row tile, split). A long chunk with few
tiles is split along the sequence (split-KV) so that the launch still has enough programs
to fill the GPU; the partial states of a split tile go to a scratch buffer and a second,
small kernel merges them exactly by log-sum-exp. The work list is built on the device with
torch ops and no host sync: the grid is an upper bound on the number of items computed
from host-known sizes, and programs past the last item return at once (CUDA-graph safe).

The programs are in `shared_attention_kernel.py`; the plain-PyTorch reference in
`shared_attention_ref.py` (re-exported here).
"""

import torch

from .shared_attention_fp8 import _grouped_fp8_mma_kernel, fp8_mma_args, v_t_descriptor
from .shared_attention_kernel import LOG2E, _grouped_shared_attention_kernel
from .shared_attention_ref import grouped_shared_attention_ref
from .shared_inputs import (
    ChunkTable,
    check_inputs,
    chunk_scale_args,
    chunk_table,
    fp8_kernel_args,
    outputs,
    pool_descriptor,
    tma_ok,
)
from .shared_split_merge import merge_tile_splits
from .shared_tuning import INTERPRETER, grouped_tuning
from .shared_work_list import build_work_list

__all__ = [
    "_grouped_shared_attention_kernel",
    "grouped_shared_attention",
    "grouped_shared_attention_ref",
]


def _default_config(d: int, g: int, device: torch.device, rows_per_group: float) -> dict:
    # the tile of this shape from the table of moska/kernels/shared_tuning.py (measured per
    # head dim, GQA ratio and rows per group); the interpreter runs few, large programs
    if device.type != "cuda":
        return INTERPRETER.launch_config(sms=1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return grouped_tuning(d, g, rows_per_group).launch_config(sms)


def grouped_shared_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [S_total, Hkv, D]
    v_pool: torch.Tensor,  # [S_total, Hkv, D]
    chunk_offsets: torch.Tensor | ChunkTable,  # [C + 1] int32, or a slot table
    sel,  # Selections: req, kv_head, chunk [N] int32, sorted by (chunk, kv_head, req)
    sm_scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    target_programs: int | None = None,
    min_split: int | None = None,
    use_tma: bool | None = None,
    warp_specialize: bool | None = None,
    merge_m: int | None = None,
    split_b: int | None = None,
    half_tail: bool | None = None,
    pipe_qk: bool | None = None,
    maxnreg: int | None = None,
    max_programs: int | None = None,
    plans: dict | None = None,
    plan_key: object = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp8_dot: bool = False,
    chunk_scales: torch.Tensor | None = None,
    fp8_mma: bool = False,
    v_pool_t: torch.Tensor | None = None,
    fp8_q_split: bool = False,
    fp8_scale_block: int = 0,
    q_rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each selection's G query rows over its chunk: (o [N,G,D] q.dtype, lse [N,G] fp32).

    e4m3 pools (float8_e4m3fn) need `kv_scales` = (k_scale, v_scale) fp32, [S_total, Hkv]
    (one per pool row and KV head, addressed like the rows) or [C, Hkv] (one per chunk and
    KV head): a value is the stored one times its scale. K/V are upcast in registers, or
    with `fp8_dot` q is cut to e4m3 per tile and QK^T runs on FP8 tensor cores, or with
    `fp8_mma` both products run on FP8 tensor cores with no KV tile upcast (q cut per row,
    scales folded into score columns and weights: `shared_attention_fp8.py`); `v_pool_t`,
    optional with `fp8_mma`, a contiguous token-major copy of V [Hkv, D, S_total] (TMA);
    `fp8_q_split` with `fp8_mma`: q as two e4m3 terms (2^-8 relative error, two QK^T dots).
    `fp8_scale_block` with `fp8_mma` and per-row scales: they are constant over that many rows
    from each chunk's start (library/fp8.py "block"): one scale per key block is read.

    `q_rotation` [D, D], optional: the pools' K is stored rotated (k R, e.g.
    `library.fp8.hadamard`), so q is rotated alike (q R, one small matmul) before the launch.

    `chunk_scales` fp32 [C], optional: chunk c's scores use `sm_scale * chunk_scales[c]`
    (parts of other softmax temperatures in one launch); None: `sm_scale` for every chunk.

    `chunk_offsets`: chunk c is pool rows `offsets[c] : offsets[c+1]`, or a `ChunkTable`
    (starts [C], ends [C]): rows `starts[c] : ends[c]` (a tiered library's GPU slots;
    an absent chunk has ends == starts and gives (0, -inf)).
    `out` = (o, lse) preallocated contiguous outputs, optional. Block sizes, warps, stages
    and the split heuristic (`target_programs` items, splits of at least `min_split` tokens)
    may be overridden, e.g. by tests and benchmarks. `merge_m` rows and `split_b` partials
    per step set the shape of the merge of split tiles. `half_tail`: a group's last tile of at
    most block_m / 2 rows computes only those (both programs; the FP8 one not with
    `max_programs`). `maxnreg` caps the registers per thread (CUDA), so more programs fit on
    an SM. `pipe_qk`: QK^T one key block ahead of the softmax (`shared_attention_pipe.py`;
    bf16/fp16/fp32 pools). `max_programs` caps the grid (its
    programs then loop over the work items), to leave room beside a concurrent kernel.
    `plans`: a cache of work lists, for callers whose selections and chunk table follow
    from `plan_key` and the sizes (one chunk read by every KV head: `shared_one_chunk.py`);
    a hit skips the two planning launches. Lists built during a CUDA graph capture are not
    kept (they live in the capture's memory pool).
    """
    table = chunk_table(chunk_offsets)  # offsets: views, no copy
    check_inputs(q, k_pool, v_pool, table, sel)
    if q_rotation is not None:
        d_ = q.shape[-1]
        if q_rotation.shape != (d_, d_) or q_rotation.device != q.device:
            raise ValueError(
                f"q_rotation must be [D, D] = {(d_, d_)} on {q.device}; got "
                f"{tuple(q_rotation.shape)} on {q_rotation.device}"
            )
        q = torch.matmul(q, q_rotation.to(q.dtype))
    fp8 = fp8_kernel_args(q, k_pool, v_pool, kv_scales, table, fp8_dot)
    per_chunk = chunk_scale_args(q, chunk_scales, table)
    kernel, mma = _grouped_shared_attention_kernel, {}
    if fp8_mma or v_pool_t is not None:
        kernel = _grouped_fp8_mma_kernel
        mma = fp8_mma_args(fp8, fp8_dot, k_pool, v_pool_t, fp8_q_split, fp8_scale_block)
    if v_pool_t is not None and use_tma is False:  # before any launch (checked again below)
        raise ValueError("v_pool_t is read through TMA: pass use_tma=True (Hopper, aligned pools)")
    _, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    n = sel.req.numel()
    o, lse = outputs(out, (n, g, d), q.dtype, q.device)
    if n == 0:
        return o, lse
    # average rows of a (chunk, kv_head) group if every pair were touched: host-known sizes only
    cfg = _default_config(d, g, q.device, n * g / max(1, min(n, table.starts.numel() * hkv)))
    for k_, v_ in (
        ("block_m", block_m),
        ("block_n", block_n),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
        ("target_programs", target_programs),
        ("min_split", min_split),
        ("use_tma", use_tma),
        ("warp_specialize", warp_specialize),
        ("merge_m", merge_m),
        ("split_b", split_b),
        ("half_tail", half_tail),
        ("pipe_qk", pipe_qk),
        ("maxnreg", maxnreg),
    ):
        if v_ is not None:
            cfg[k_] = v_
    for k_ in ("block_m", "block_n", "merge_m", "split_b"):
        if cfg[k_] < 1 or cfg[k_] & (cfg[k_] - 1):
            raise ValueError(f"{k_} must be a power of two, got {cfg[k_]}")
    plan_args = (hkv, g, cfg["block_m"], cfg["block_n"], cfg["target_programs"], cfg["min_split"])
    key = None if plans is None else (plan_key, q.device, n, *plan_args)
    plan = None if plans is None else plans.get(key)
    if plan is None:
        plan = build_work_list(sel, table, *plan_args)
        capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if plans is not None and not capturing:  # a capture's tensors live in its pool
            plans[key] = plan
    work, meta, w_max = plan
    o_part = torch.empty(w_max, cfg["block_m"], d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(w_max, cfg["block_m"], device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    k_desc = v_desc = None
    if cfg["use_tma"] and tma_ok(k_pool, v_pool):
        k_desc = pool_descriptor(k_pool, cfg["block_n"])
        v_desc = pool_descriptor(v_pool, cfg["block_n"])
        if v_pool_t is not None:
            v_desc = v_t_descriptor(v_pool_t, cfg["block_n"])
    if v_pool_t is not None and v_desc is None:
        raise ValueError("v_pool_t is read through TMA: pass use_tma=True (Hopper, aligned pools)")
    grid = w_max if max_programs is None else max(1, min(w_max, max_programs))
    if cfg["half_tail"] and cfg["block_m"] >= 32:  # both programs (the FP8 one since session 27)
        mma["HALF_TAIL"] = True
    if cfg["pipe_qk"]:
        if fp8 or kernel is not _grouped_shared_attention_kernel:
            raise ValueError("pipe_qk runs bf16/fp16/fp32 pools only: drop it for e4m3 KV")
        mma["PIPE_QK"] = True
    kernel[(grid,)](
        q,
        k_pool,
        v_pool,
        k_desc,
        v_desc,
        table.starts,
        table.ends,
        sel.req,
        sel.kv_head,
        sel.chunk,
        work,
        meta,
        o,
        lse,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        w_max,
        sm_scale * LOG2E,
        G=g,
        D=d,
        BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"],
        USE_TMA=k_desc is not None,
        WARP_SPEC=cfg["warp_specialize"],
        PRECISION=precision,
        PERSISTENT=max_programs is not None,
        **fp8,
        **per_chunk,
        **mma,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
    )
    merge_tile_splits(
        work, meta, o_part, lse_part, o, lse, g, cfg["block_m"], cfg["merge_m"], cfg["split_b"]
    )
    return o, lse
