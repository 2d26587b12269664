"""One-off prototype: a persistent grouped shared attention whose programs run their items
back to back in one flattened loop (item, KV block), so TMA loads of an item's first blocks
are issued while the previous item is still computing. Compared with the shipped kernel on
a routed decode step (256 chunks x 4096 tokens, top-8); also a chunk-length sweep of the
shipped kernel at equal bytes and FLOPs (is the per-program cost what limits it?).
Usage on the GPU machine: PYTHONPATH=. python3 bench/persistent_proto.py  (JSON in $OUT)
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

from moska.bench.common import environment
from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, bench_graph, ceilings, rel
from moska.bench.kernels_util import sorted_sel
from moska.kernels.merge import merge_finish
from moska.kernels.shared_attention import grouped_shared_attention
from moska.kernels.shared_inputs import pool_descriptor
from moska.kernels.shared_work_list import build_work_list

LOG2E = 1.4426950408889634


@triton.jit
def _persistent_kernel(
    q_ptr,
    k_desc,
    v_desc,
    offsets_ptr,
    sel_req_ptr,
    sel_kv_ptr,
    sel_chunk_ptr,
    work_ptr,
    meta_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    W,
    qk_scale,
    NB,  # KV blocks per item (every chunk NB * BLOCK_N tokens or fewer)
    NUM_PROGS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    n_items = tl.load(meta_ptr)
    mine = tl.maximum(n_items - pid + NUM_PROGS - 1, 0) // NUM_PROGS
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.zeros([BLOCK_M, D], dtype=q_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t in tl.range(0, mine * NB, num_stages=STAGES):
        i = t // NB
        j = t - i * NB
        w = pid + i * NUM_PROGS
        start = tl.load(work_ptr + w)
        chunk = tl.load(sel_chunk_ptr + start)
        kv = tl.load(sel_kv_ptr + start)
        c_lo = tl.load(offsets_ptr + chunk)
        c_hi = tl.load(offsets_ptr + chunk + 1)
        kpos = c_lo + j * BLOCK_N
        if j == 0:
            n_sel = tl.load(work_ptr + W + w)
            tile = tl.load(work_ptr + 2 * W + w)
            rows = tile * BLOCK_M + offs_m
            row_ok = rows < n_sel * G
            req = tl.load(sel_req_ptr + start + rows // G, mask=row_ok, other=0)
            head = kv * G + rows % G
            q = tl.load(
                q_ptr
                + req[:, None].to(tl.int64) * stride_qb
                + head[:, None] * stride_qh
                + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        k = k_desc.load([kpos, kv * D])
        v = v_desc.load([kpos, kv * D])
        s = tl.dot(q, k.T)
        s = tl.where(((kpos + offs_n) < c_hi)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 at an item's first block: acc restarts
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if j == NB - 1:
            n_sel = tl.load(work_ptr + W + w)
            tile = tl.load(work_ptr + 2 * W + w)
            rows = tile * BLOCK_M + offs_m
            row_ok = rows < n_sel * G
            o, lse = merge_finish(m_i, l_i, acc)
            out_rows = (start * G + rows).to(tl.int64)
            tl.store(
                o_ptr + out_rows[:, None] * D + offs_d[None, :],
                o.to(o_ptr.dtype.element_ty),
                mask=row_ok[:, None],
            )
            tl.store(lse_ptr + out_rows, lse, mask=row_ok)


def persistent_attention(q, k, v, offs, sel, max_len, bm, bn, warps, stages, per_sm):
    n = sel.req.numel()
    g = HQ // HKV
    o = torch.empty(n, g, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(n, g, device=q.device, dtype=torch.float32)
    work, meta, w_max = build_work_list(sel, offs, HKV, g, bm, bn, 1, 1 << 30)  # no splits
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    progs = min(w_max, per_sm * sms)
    _persistent_kernel[(progs,)](
        q, pool_descriptor(k, bn), pool_descriptor(v, bn), offs, sel.req, sel.kv_head,
        sel.chunk, work, meta, o, lse, q.stride(0), q.stride(1), w_max, SCALE * LOG2E,
        triton.cdiv(max_len, bn),
        NUM_PROGS=progs, G=g, D=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
        num_warps=warps,
    )  # fmt: skip
    return o, lse


def main():
    torch.manual_seed(0)
    peak, bw = ceilings()
    S, TOPK = 256 * 4096, 8
    k = torch.randn(S, HKV, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    rows = []
    # 1) the shipped kernel at equal bytes and FLOPs, chunk length L, top-(32768/L)
    for B in (1024, 2048):
        for L in (2048, 4096, 8192, 16384, 65536):
            C, kk = S // L, max(1, 8 * 4096 // L)
            offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
            q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
            sel = sorted_sel(torch.rand(B, C, device=DEV).topk(kk, -1).indices, C)
            t = bench_graph(lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE))
            fl = 4 * B * kk * L * HQ * D
            rows.append(dict(kind="chunk_len", B=B, L=L, top_k=kk, ms=t, tflops=fl / t / 1e9))
            print(json.dumps(rows[-1]), flush=True)
    # 2) the persistent prototype against the shipped kernel, L = 4096
    L, C = 4096, 256
    offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
    for B in (256, 512, 1024, 2048):
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        sel = sorted_sel(torch.rand(B, C, device=DEV).topk(TOPK, -1).indices, C)
        ref = grouped_shared_attention(q, k, v, offs, sel, SCALE)
        row = dict(kind="persistent", B=B, L=L)
        row["shipped_ms"] = bench_graph(lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE))
        for bm, bn, w, st, per_sm in (
            (64, 64, 4, 3, 2),
            (64, 64, 4, 4, 1),
            (64, 128, 4, 3, 1),
            (128, 64, 8, 3, 1),
            (128, 128, 8, 2, 1),
            (128, 128, 8, 3, 1),
        ):
            name = f"m{bm}n{bn}w{w}s{st}p{per_sm}"
            args = (q, k, v, offs, sel, L, bm, bn, w, st, per_sm)
            try:
                o, lse = persistent_attention(*args)
                row[f"{name}_relerr"] = rel(o, ref[0])
                row[f"{name}_lse_relerr"] = rel(lse, ref[1])
                row[f"{name}_ms"] = bench_graph(lambda args=args: persistent_attention(*args))
            except Exception as e:  # noqa: BLE001
                row[f"{name}_err"] = repr(e)[-300:]
        fl = 4 * B * TOPK * L * HQ * D
        row["floor_ms"] = max(S * HKV * D * 4 / bw / 1e6, fl / peak / 1e9)
        print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}))
        rows.append(row)
    res = dict(environment(sys.argv), command="PYTHONPATH=. python3 bench/persistent_proto.py")
    res.update(gemm_peak_tflops=peak, copy_GBps=bw, rows=rows)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "persistent_proto.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        if r["kind"] == "chunk_len":
            print(f"shipped B={r['B']} L={r['L']}: {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s")
        else:
            t = {a[:-3]: round(b, 3) for a, b in r.items() if a.endswith("_ms")}
            print(f"B={r['B']} {t}")


if __name__ == "__main__":
    main()
