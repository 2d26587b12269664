"""The NCCL baseline for KV transfer between two GPUs of one host: a prompt's KV at model
dims (`[2, n_blocks, block_size, Hkv, D]` per layer, as `pd_transfer` sends it) sent layer
by layer with `torch.distributed` point-to-point from rank 0 (GPU 0) to rank 1 (GPU 1),
rank r on `cuda:r` (bound at init: `device_id`). What the
CUDA IPC ring of `pd/ring.py` is measured against once the instances sit on two GPUs
(NCCL refuses two ranks on one GPU, hence the ring there). Checked: per-layer integer sums
at both ends. CPU form: gloo between two processes (the code path, not a figure).

    python -m moska.bench.nccl_p2p --tokens 8192 --out /tmp/out/nccl_p2p.json
    python -m moska.bench.nccl_p2p --cpu-dry-run
"""

from __future__ import annotations

import argparse
import os
import queue
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

KV_HEADS, HEAD_DIM, LAYERS = 8, 128, 32  # Llama-3.1-8B


def _sums(layers: list[torch.Tensor]) -> list[int]:
    return [int(t.view(torch.int16).to(torch.int64).sum()) for t in layers]


def _rank(rank: int, port: int, args, out) -> None:
    # rank r on GPU r, both processes seeing the same GPUs, the device bound at init
    # (`device_id`): each seeing "its own GPU first" through CUDA_VISIBLE_DEVICES set in the
    # spawned child, NCCL 2.28.9 found both ranks on one GPU ("Duplicate GPU detected:
    # rank 0 and rank 1 both on CUDA device 60", invalid usage) on 2 H200s
    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=120))
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=rank, world_size=2,
        device_id=dev if cuda else None,
    )  # fmt: skip
    n_blocks = (args.tokens - 1) // args.block_size
    shape = (2, n_blocks, args.block_size, KV_HEADS, HEAD_DIM)
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float16
    layers = [torch.randn(shape, generator=gen, device=dev).to(dtype) for _ in range(args.layers)]
    bufs = [torch.empty_like(t) for t in layers]
    times = []
    for _ in range(args.repeats + 1):  # the first one sets up the NCCL channels
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t, b in zip(layers, bufs):
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(b, 0)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()  # the receiver holds it all when both pass
        times.append(time.perf_counter() - t0)
    if rank == 1:
        exact = _sums(bufs) == _sums(layers)  # the same seeded generator on both ranks
        nbytes = sum(t.numel() * t.element_size() for t in layers)
        out.put({"seconds": times[1:], "bytes": nbytes, "exact": exact, "shape": list(shape)})
    dist.destroy_process_group()


def _result(out, procs, timeout_s: float) -> dict:
    """Rank 1's report, or SystemExit as soon as a rank has died without one (a rank that
    raised left the parent waiting on the queue until the script's `timeout` killed it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.kill()
                raise SystemExit(f"NCCL baseline: rank(s) {failed} (rank, exit code) failed; "
                                 "their traceback is above") from None  # fmt: skip
    for p in procs:
        p.kill()
    raise SystemExit(f"NCCL baseline: no result within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment, write_json
    from moska.pd import gpu_placement
    from moska.pd.cluster import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench/results/nccl_p2p.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="gloo on CPU, 1K tokens")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.tokens, args.layers, args.repeats = "cpu", 1024, 4, 2
        if args.out == "bench/results/nccl_p2p.json":
            args.out = "bench/results/nccl_p2p_cpu.json"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.device == "cuda" and gpu_placement.visible_gpu_count() < 2:
        raise SystemExit("the NCCL baseline needs two GPUs (NCCL refuses one GPU twice)")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = _result(out, procs, timeout_s=300.0)
    for p in procs:
        p.join(60)
    best = min(got["seconds"])
    summary = {
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "transfer_s": round(best, 5),
        "per_layer_ms": round(best / args.layers * 1e3, 3),
        "gb_per_s": round(got["bytes"] / best / 1e9, 3),
        "exact": got["exact"],
    }
    report = {"benchmark": "nccl_p2p", "environment": environment(),
              "config": vars(args) | {"visible": visible, "layer_shape": got["shape"],
                                      "bytes": got["bytes"]},
              "seconds": got["seconds"], "summary": summary}  # fmt: skip
    write_json(args.out, report)
    print(summary, f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
