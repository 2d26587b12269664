"""Kernel benchmark, part 3: paged decode attention at 128K vs the best SDPA backend."""

# Each timed lambda below runs inside its own loop iteration (do_bench calls it at once),
# so late binding of loop variables (B023) cannot bite; a failing variant or backend is
# recorded in its row and the run goes on (BLE001).
# ruff: noqa: B023, BLE001

import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, G, bench, bench_graph, log, rel
from moska.kernels.paged_attention import (
    paged_decode_attention,
)


def case_paged(B_list, ctx=131072):
    rows_out = []
    bs = 16
    for B in B_list:
        nb = B * ctx // bs
        kc = torch.randn(nb, bs, HKV, D, device=DEV, dtype=DT)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device=DEV).int().view(B, ctx // bs)
        sl = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        o, _ = paged_decode_attention(q, kc, vc, bt, sl, SCALE)
        row = {
            "B": B,
            "ctx": ctx,
            "ours_default_ms": bench(lambda: paged_decode_attention(q, kc, vc, bt, sl, SCALE)),
        }
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        best_cfg = ("default", row["ours_default_ms"])
        for bn in (64, 128):
            for st in (2, 4):
                for mult in (2, 4):
                    ns = max(1, triton.cdiv(mult * sms, B * HKV))
                    name = f"n{bn}s{st}x{mult}"
                    try:
                        t = bench(
                            lambda: paged_decode_attention(
                                q, kc, vc, bt, sl, SCALE, num_splits=ns, block_n=bn, num_stages=st
                            )
                        )
                        row[f"ours_{name}_ms"] = t
                        if t < best_cfg[1]:
                            best_cfg = (name, t)
                    except Exception as e:
                        row[f"ours_{name}_err"] = repr(e)[:200]
        row["ours_eager_ms"] = row["ours_default_ms"]
        try:
            row["ours_graph_ms"] = bench_graph(
                lambda: paged_decode_attention(q, kc, vc, bt, sl, SCALE)
            )
        except Exception as e:
            row["ours_graph_err"] = repr(e)[-300:]
        row["ours_ms"] = min(row["ours_eager_ms"], row.get("ours_graph_ms", 1e30))
        row["ours_best_cfg"], row["ours_best_ms"] = best_cfg
        # SDPA on contiguous KV (same bytes): [B, ctx, Hkv, D]
        kd = kc[bt.long()].view(B, ctx, HKV, D)
        vd = vc[bt.long()].view(B, ctx, HKV, D)
        q4 = q.view(B, HKV, G, D)  # G query heads as rows of their KV head
        kt, vt = kd.transpose(1, 2), vd.transpose(1, 2)
        best = None
        for name, fn in (
            (
                "flash_varlen_op",
                lambda: torch.ops.aten._flash_attention_forward(
                    q.unsqueeze(1), kd, vd, None, None, 1, ctx, 0.0, False, False, scale=SCALE
                )[0],
            ),
            ("sdpa_flash", lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q4, kt, vt)),
            ("sdpa_cudnn", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q4, kt, vt)),
            ("sdpa_efficient", lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION, q4, kt, vt)),
        ):
            try:
                r_ = fn()
                row[f"{name}_relerr"] = rel(o, r_.reshape(B, HQ, D))
                row[f"{name}_ms"] = bench(fn)
                if best is None or row[f"{name}_ms"] < best[1]:
                    best = (name, row[f"{name}_ms"])
            except Exception as e:
                row[f"{name}_err"] = repr(e)[:200]
        row["sdpa_best"], row["sdpa_best_ms"] = best
        row["ours_vs_sdpa"] = best[1] / row["ours_ms"]  # >1: ours faster
        row["ours_GBps"] = B * ctx * HKV * D * 4 / row["ours_ms"] / 1e6
        log(
            json.dumps(
                {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}
            )
        )
        rows_out.append(row)
        torch.cuda.empty_cache()
    return rows_out


def _sdpa(backend, q4, kt, vt):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, kt, vt, scale=SCALE)
