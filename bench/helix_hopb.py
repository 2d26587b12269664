"""Helix HOP-B: one layer's KV-parallel attention + all-to-all with and without overlapping
the all-to-all of one micro-batch with the attention of the next.

Each of `--ranks` processes (one KVP group: TPA = 1, the all-to-all's group) holds its
shard of B decode rows' KV (`--context` tokens per request over the ranks, random) and
runs `helix.helix_exchange` — the partial attention over its shard, the packed (o, lse)
all-to-all by query heads, the LSE merge — with 1 micro-batch (no HOP-B) and with 2 and 4
(HOP-B), interleaved per iteration so that all see the same background load. Also timed:
the attention alone (no exchange) and the all-to-all alone (the whole batch's packed
buffer), whose sum is what no overlap costs and whose max is what perfect overlap would.
Every figure is the median over iterations of the slowest rank (a barrier before each).

CPU/gloo here (the attention is the PyTorch reference, one thread per rank; this box's 2
cores are shared). On GPUs: `--device cuda --backend nccl --dtype bfloat16` with a GPU per
rank (the Triton kernels); several ranks on one GPU need gloo (host-staged: a logic run).

Usage: python bench/helix_hopb.py [--ranks 2] [--batch 64 --context 2048 --heads 32
       --kv-heads 8 --head-dim 128] [--iters 12] [--out bench/results/helix_hopb_cpu.json]
       python bench/helix_hopb.py --cpu-dry-run   (tiny shapes, a check that it runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MICROBATCHES = (1, 2, 4)


def batched_decode(q, k_cache, v_cache, block_tables, visible, sm_scale):
    """Decode attention of all rows at once (gathered blocks, two einsums): a stand-in for a
    real kernel's cost on the CPU, where the engine's PyTorch reference loops over rows in
    Python (~4 ms a row here), which would drown any communication. Exact: fp32 (o, lse)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    n = int(visible.max())
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :n].float()  # [B, L, Hkv, D]
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :n].float()
    s = torch.einsum("bhgd,blhd->bhgl", q.float().view(b, hkv, hq // hkv, d), k) * sm_scale
    mask = torch.arange(n, device=q.device)[None, :] >= visible[:, None]  # [B, L]
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgl,blhd->bhgd", torch.softmax(s, -1), v).reshape(b, hq, d)
    return o.to(q.dtype), torch.logsumexp(s, -1).reshape(b, hq)


def _rank(rank: int, a: argparse.Namespace, store: str, out: str) -> None:
    from moska.distributed.helix import _pack, helix_exchange
    from moska.kernel_ops import kernel_ops

    torch.set_num_threads(1)
    dev = torch.device(
        a.device if a.device == "cpu" else f"cuda:{rank % torch.cuda.device_count()}"
    )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # nccl: host tensors (the timing's max over ranks) go over gloo in the same group
    backend = "cpu:gloo,cuda:nccl" if a.backend == "nccl" else a.backend
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=a.ranks)
    dtype = getattr(torch, a.dtype)
    ops = kernel_ops("torch" if dev.type == "cpu" else "triton", dev)
    if a.attention == "batched":
        ops = dataclasses.replace(ops, paged_decode=batched_decode)
    g = torch.Generator().manual_seed(rank)
    local = -(-a.context // a.ranks)  # tokens of each request on this rank
    nb = -(-local // a.block)
    shape = (a.batch * nb, a.block, a.kv_heads, a.head_dim)
    kc = torch.randn(shape, generator=g).to(dev, dtype)
    vc = torch.randn(shape, generator=g).to(dev, dtype)
    tables = torch.arange(a.batch * nb, dtype=torch.int32, device=dev).view(a.batch, nb)
    visible = torch.full((a.batch,), local, dtype=torch.int32, device=dev)
    q = torch.randn(a.batch, a.heads, a.head_dim, generator=torch.Generator().manual_seed(9))
    q = q.to(dev, dtype)
    scale = a.head_dim**-0.5
    group = dist.group.WORLD

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def serial(m: int) -> torch.Tensor:
        """m micro-batches, each attended, then exchanged and waited for, then the next."""
        cuts = torch.linspace(0, a.batch, m + 1).round().long().tolist()
        return torch.cat(
            [
                helix_exchange(q[i:j], kc, vc, tables[i:j], visible[i:j], scale, ops, group)
                for i, j in itertools.pairwise(cuts)
            ]
        )

    o, lse = ops.paged_decode(q, kc, vc, tables, visible, scale)
    packed = _pack(o, lse, a.ranks)
    recv = torch.empty_like(packed)
    cases = {
        **{
            f"helix mb={m}": lambda m=m: helix_exchange(
                q, kc, vc, tables, visible, scale, ops, group, m
            )
            for m in MICROBATCHES
        },
        **{
            f"serial mb={m}": lambda m=m: serial(m)  # same micro-batches, no overlap
            for m in MICROBATCHES[1:]
        },
        "attention only": lambda: ops.paged_decode(q, kc, vc, tables, visible, scale),
        "all-to-all only": lambda: dist.all_to_all_single(recv, packed),
    }
    want = helix_exchange(q, kc, vc, tables, visible, scale, ops, group, 1)
    same = all(
        torch.equal(helix_exchange(q, kc, vc, tables, visible, scale, ops, group, m), want)
        for m in MICROBATCHES
    )
    times: dict[str, list[float]] = {k: [] for k in cases}
    for it in range(a.iters + 1):  # the first round warms up
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's
            if it:
                times[name].append(dt.item() * 1e3)
    if rank == 0:
        res = {
            "ms": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "ms_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "hopb_result_equal_to_mb1": same,
            "all_to_all_bytes_per_rank": packed.numel() * packed.element_size(),
            "kv_bytes_per_rank": 2 * kc.numel() * kc.element_size(),
        }
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def run(a: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="helix-hopb-")
    out = os.path.join(tmp, "result.json")
    mp.spawn(_rank, args=(a, os.path.join(tmp, "store"), out), nprocs=a.ranks, join=True)
    return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="KVP ranks (processes)")
    p.add_argument("--batch", type=int, default=64, help="decode rows B")
    p.add_argument("--context", type=int, default=2048, help="KV tokens per request, all ranks")
    p.add_argument("--heads", type=int, default=32, help="query heads of the TPA group")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--attention",
        default="kernel",
        choices=("kernel", "batched"),
        help="kernel: the engine's (the PyTorch reference on CPU, Triton on CUDA); batched: "
        "all rows in two einsums (a fast CPU stand-in)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes, 2 iterations")
    p.add_argument("--out", default=None, help="write the JSON report here")
    a = p.parse_args(argv)
    if a.cpu_dry_run:
        a.batch, a.context, a.heads, a.kv_heads, a.head_dim, a.iters = 8, 128, 8, 2, 16, 2
    res = run(a)
    ms = res["ms"]
    base, comp, comm = ms["helix mb=1"], ms["attention only"], ms["all-to-all only"]
    best = min(MICROBATCHES[1:], key=lambda m: ms[f"helix mb={m}"])
    report = {
        "benchmark": "helix_hopb",
        "shapes": {
            k: getattr(a, k)
            for k in (
                "ranks",
                "batch",
                "context",
                "heads",
                "kv_heads",
                "head_dim",
                "block",
                "attention",
            )
        },
        "dtype": a.dtype,
        "device": a.device,
        "backend": a.backend,
        "environment": environment(argv),
        "cpu_threads_per_rank": 1,
        "host_cpus": os.cpu_count(),
        **res,
        "summary": {
            "layer_ms_no_hopb": base,
            **{f"layer_ms_hopb_mb{m}": ms[f"helix mb={m}"] for m in MICROBATCHES[1:]},
            **{f"layer_ms_serial_mb{m}": ms[f"serial mb={m}"] for m in MICROBATCHES[1:]},
            "best_hopb_speedup": round(base / ms[f"helix mb={best}"], 3),
            "overlap_gain_at_best": round(ms[f"serial mb={best}"] / ms[f"helix mb={best}"], 3),
            "best_microbatches": best,
            "attention_only_ms": comp,
            "all_to_all_only_ms": comm,
            "comm_share_of_serial": round(comm / (comp + comm), 3) if comp + comm else None,
            "perfect_overlap_bound_speedup": round((comp + comm) / max(comp, comm), 3),
            "hopb_equal_to_no_hopb": res["hopb_result_equal_to_mb1"],
        },
    }
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
