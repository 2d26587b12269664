"""The grouped shared step as ONE ragged SDPA call, against the Triton grouped kernel.

Issue #22.2 asks for the strongest plain-PyTorch baseline of each step, and #22.3 for the
grouped step near its floor at G >= 4, where the Triton kernel reads 0.62 of the read
floor at B = 1,024 (bench/results/kernels_shapes_high_g_h200_session17b.json). This bench
times the same work through the vendor kernels, each selection's chunk read in place:

- the pool stored chunk-major and head-major, [C, Hkv, L, D] (a library layout chosen at
  build time), so the keys of one (chunk, KV head) group are one contiguous [L, D] block,
  and the groups follow the Selections' own (chunk, kv_head, req) order;
- every group is one ragged sequence: its selections' G query rows each (a gather of q,
  timed), keys = its block (cu_seq_k = arange * L, in place);
- cuDNN's ragged SDPA (`aten::_cudnn_attention_forward` with cum_seq_q / cum_seq_k, one
  head) and FlashAttention-2 varlen (`aten::_flash_attention_forward`), each with its LSE;
- the Triton grouped kernel (the table's tile) on the [S, Hkv, D] pool.

Every output (o, lse) is checked against the Triton kernel's at full size and against the
fp32 reference on a small problem before anything is timed. Times are CUDA-graph replays
(median); floors from a read-only stream and the matmul peak measured in the run.

    python -m moska.bench.kernels_grouped_ragged --out $OUT/kernels_grouped_ragged.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch

from moska.bench.common import environment, write_json
from moska.bench.floors import floor_ms, grouped_shared_cost, kernel_ceilings
from moska.bench.kernels_shapes import selections
from moska.bench.kernels_shapes import timer as make_timer
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref


def ragged_inputs(q: torch.Tensor, sel: Selections, num_groups: int, g: int):
    """(packed q [N * G, 1, D], cu_seq_q [num_groups + 1] int32): selection n's G rows at
    n * G (the Selections' (chunk, kv_head, req) order is the groups' order), device ops only."""
    n, d = sel.req.numel(), q.shape[-1]
    hq = q.shape[1]
    rows = sel.req.long() * hq + sel.kv_head.long() * g  # first query head of each selection
    idx = (rows[:, None] + torch.arange(g, device=q.device)).reshape(-1)
    qp = q.reshape(-1, d).index_select(0, idx).view(n * g, 1, d)
    hkv = hq // g
    group = sel.chunk.long() * hkv + sel.kv_head.long()
    counts = torch.zeros(num_groups, dtype=torch.int64, device=q.device)
    counts.index_add_(0, group, torch.full_like(group, g))  # bincount would sync (its size)
    cu = torch.zeros(num_groups + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return qp, cu


def ragged_step(backend, q, k_cm, v_cm, sel, cu_k, g, scale, max_q):
    """(o [N, G, D], lse [N, G] fp32) of the grouped step through one ragged `backend` call
    over the chunk-major pools k_cm / v_cm [C * Hkv * L, 1, D]."""
    n, d = sel.req.numel(), q.shape[-1]
    qp, cu_q = ragged_inputs(q, sel, cu_k.numel() - 1, g)
    max_k = int(k_cm.shape[0] // (cu_k.numel() - 1))
    if backend == "reference":
        res = ragged_reference(qp, k_cm, v_cm, cu_q, cu_k, scale)
    elif backend == "cudnn":
        res = torch.ops.aten._cudnn_attention_forward(
            qp, k_cm, v_cm, None, cu_q, cu_k, max_q, max_k, True, 0.0, False, False, scale=scale
        )
    else:
        res = torch.ops.aten._flash_attention_forward(
            qp, k_cm, v_cm, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale
        )
    o, lse = res[0], res[1]
    return o.view(n, g, d), lse.float().reshape(-1)[: n * g].view(n, g)


def ragged_reference(qp, k_cm, v_cm, cu_q, cu_k, scale):
    """The ragged contract in plain torch, one sequence at a time in fp32 (CPU tests):
    (o [T, 1, D], lse [T] fp32)."""
    o = torch.zeros(qp.shape, dtype=torch.float32, device=qp.device)
    lse = torch.full((qp.shape[0],), float("-inf"), device=qp.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        s = qp[cq[i] : cq[i + 1], 0].float() @ k_cm[ck[i] : ck[i + 1], 0].float().T * scale
        lse[cq[i] : cq[i + 1]] = torch.logsumexp(s, -1)
        o[cq[i] : cq[i + 1], 0] = torch.softmax(s, -1) @ v_cm[ck[i] : ck[i + 1], 0].float()
    return o, lse


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """`kernels_util.rel` over b's finite entries only (an empty group's lse is -inf)."""
    a, b = a.float(), b.float()
    ok = torch.isfinite(b)
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


def problem(c, L, hkv, d, g, b, topk, routing, dtype, dev):
    cfg = {"chunks": c, "topk": topk, "hkv": hkv}
    sel = selections(b, cfg, routing, dev)
    k = torch.randn(c * L, hkv, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    offs = torch.arange(0, c * L + 1, L, dtype=torch.int32, device=dev)
    q = torch.randn(b, hkv * g, d, device=dev, dtype=dtype)
    # chunk-major, head-major copy: [C, Hkv, L, D] flattened to [C * Hkv * L, 1, D]
    k_cm = k.view(c, L, hkv, d).transpose(1, 2).contiguous().view(-1, 1, d)
    v_cm = v.view(c, L, hkv, d).transpose(1, 2).contiguous().view(-1, 1, d)
    cu_k = torch.arange(0, c * hkv * L + 1, L, dtype=torch.int32, device=dev)
    return {"q": q, "k": k, "v": v, "offs": offs, "sel": sel, "k_cm": k_cm, "v_cm": v_cm,
            "cu_k": cu_k}  # fmt: skip


def check_small(dev: str, log) -> dict:
    """Both ragged backends and the Triton kernel against the fp32 reference, small sizes."""
    out: dict[str, dict[str, float | str]] = {}
    for d, g in ((128, 4), (64, 8)):
        p = problem(8, 256, 2, d, g, 24, 3, "uniform", torch.bfloat16, dev)
        o_ref, lse_ref = grouped_shared_attention_ref(
            p["q"], p["k"], p["v"], p["offs"], p["sel"], d**-0.5
        )
        max_q = 24 * g
        for name in ("cudnn", "flash"):
            try:
                o, lse = ragged_step(name, p["q"], p["k_cm"], p["v_cm"], p["sel"], p["cu_k"], g,
                                     d**-0.5, max_q)  # fmt: skip
                out[f"{name}_D{d}_G{g}"] = {"o": rel(o, o_ref), "lse": rel(lse, lse_ref)}
            except Exception as e:  # noqa: BLE001 - record why a backend cannot run
                out[f"{name}_D{d}_G{g}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        o, lse = grouped_shared_attention(p["q"], p["k"], p["v"], p["offs"], p["sel"], d**-0.5)
        out[f"triton_D{d}_G{g}"] = {"o": rel(o, o_ref), "lse": rel(lse, lse_ref)}
    log("small checks", json.dumps(out))
    return out


def point(p, d, g, b, routing, measure, read_bps, mm_fps, c, L, hkv, log) -> dict:
    sel, scale = p["sel"], d**-0.5
    n = sel.req.numel()
    counts = torch.bincount(sel.chunk.long() * hkv + sel.kv_head.long(), minlength=c * hkv)
    max_rows = int(counts.max()) * g
    fns: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        "triton": lambda: grouped_shared_attention(p["q"], p["k"], p["v"], p["offs"], sel, scale)
    }
    bounds = {"tight": -(-max_rows // 64) * 64, "static": b * g}
    for name in ("cudnn", "flash"):
        for bn, mq in bounds.items():
            fns[f"{name}_{bn}"] = functools.partial(
                ragged_step, name, p["q"], p["k_cm"], p["v_cm"], sel, p["cu_k"], g, scale, mq
            )
    o_ref, lse_ref = fns["triton"]()
    pt: dict = {"D": d, "G": g, "B": b, "routing": routing, "selections": n,
                "max_rows": max_rows, "mean_rows": n * g / max(1, int((counts > 0).sum())),
                "relerr_vs_triton": {}, "ms": {}, "errors": {}}  # fmt: skip
    for name, fn in fns.items():
        try:
            o, lse = fn()
            pt["relerr_vs_triton"][name] = {"o": rel(o, o_ref), "lse": rel(lse, lse_ref)}
            if name == "triton" or max(pt["relerr_vs_triton"][name].values()) < 1e-2:
                pt["ms"][name] = measure(fn)
        except Exception as e:  # noqa: BLE001 - record it and go on
            pt["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    touched = int(torch.unique(sel.chunk).numel())
    nbytes, flops = grouped_shared_cost(n, g, touched, L, hkv, d, b, p["k"].element_size())
    pt |= floor_ms(nbytes, flops, read_bps, mm_fps)
    pt["read_floor_fraction"] = {k: pt["read_floor_ms"] / t for k, t in pt["ms"].items()}
    pt["floor_fraction"] = {k: pt["floor_ms"] / t for k, t in pt["ms"].items()}
    best = min(pt["ms"], key=pt["ms"].get)
    pt["best"] = best
    pt["vendor_over_triton_time"] = (
        min((t for k, t in pt["ms"].items() if k != "triton"), default=float("nan"))
        / pt["ms"]["triton"]
    )
    log(f"D{d} G{g} B{b} {routing}: " + " ".join(f"{k} {t:.3f}" for k, t in pt["ms"].items())
        + f" | floor {pt['floor_ms']:.3f} ({pt['bound']}) read {pt['read_floor_ms']:.3f}"
        + f" | errors {list(pt['errors'])}")  # fmt: skip
    return pt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--b-list", default="1024,256,64")
    ap.add_argument("--shapes", default="128:4,128:8,64:4,64:8", help="D:G pairs")
    ap.add_argument("--routings", default="uniform,zipf")
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args(argv)
    t0 = time.time()

    def log(*a):
        print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)

    dev = "cuda"
    torch.manual_seed(0)
    c, L, hkv, topk = 256, 4096, 8, 8
    ceil, read_bps, mm_fps = kernel_ceilings(dev, False, 5)
    log(f"read {read_bps / 1e9:.0f} GB/s, matmul {mm_fps / 1e12:.0f} TFLOP/s")
    payload = {**environment(), "config": {"chunks": c, "chunk_len": L, "hkv": hkv, "topk": topk,
               "dtype": "bfloat16"}, "ceilings": ceil, "small_checks": check_small(dev, log),
               "points": []}  # fmt: skip
    measure = make_timer(dev)
    for shape in args.shapes.split(","):
        d, g = (int(x) for x in shape.split(":"))
        for b in (int(x) for x in args.b_list.split(",")):
            for routing in args.routings.split(","):
                if time.time() - t0 > args.budget_s:
                    log("budget spent: skipping", d, g, b, routing)
                    continue
                p = problem(c, L, hkv, d, g, b, topk, routing, torch.bfloat16, dev)
                payload["points"].append(
                    point(p, d, g, b, routing, measure, read_bps, mm_fps, c, L, hkv, log)
                )
                del p
                torch.cuda.empty_cache()
                write_json(args.out, payload)
    payload["summary"] = summarize(payload["points"])
    payload["seconds"] = time.time() - t0
    write_json(args.out, payload)
    print_table(payload["points"])


def summarize(points: list[dict]) -> dict:
    out = {}
    for pt in points:
        key = f"D{pt['D']}_G{pt['G']}_B{pt['B']}_{pt['routing']}"
        out[key] = {"best": pt["best"], "bound": pt["bound"],
                    "triton_floor_fraction": pt["floor_fraction"].get("triton"),
                    "best_floor_fraction": pt["floor_fraction"][pt["best"]],
                    "best_read_floor_fraction": pt["read_floor_fraction"][pt["best"]],
                    "triton_ms": pt["ms"].get("triton"), "best_ms": pt["ms"][pt["best"]],
                    "vendor_over_triton_time": pt["vendor_over_triton_time"]}  # fmt: skip
    return out


def print_table(points: list[dict]) -> None:
    names = sorted({k for pt in points for k in pt["ms"]})
    print("| D | G | B | routing | floor ms (bound) | " + " | ".join(names) + " |")
    for pt in points:
        cells = [f"{pt['ms'][n]:.3f} ({pt['floor_fraction'][n]:.2f})" if n in pt["ms"] else "-"
                 for n in names]  # fmt: skip
        print(f"| {pt['D']} | {pt['G']} | {pt['B']} | {pt['routing']} | "
              f"{pt['floor_ms']:.3f} ({pt['bound']}) | " + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
