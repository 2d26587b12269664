"""KV transfer between a prefill and a decode rank (`moska.pd.transport`, gloo): seconds and
GB/s per layer for a prompt of N tokens at a model's KV dims (default Llama-3.1-8B: 32
layers, 8 KV heads of 128, bf16), the baseline being one torch copy of the same bytes
between host buffers in the same run. Both ranks live in this process (threads), as the
CPU tests run them; KV on a GPU is staged through host memory, as the transport does.

    python -m moska.bench.pd_transfer --cpu-dry-run
    python -m moska.bench.pd_transfer --tokens 8192 --device cuda
"""

from __future__ import annotations

import argparse
import threading
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment, write_json
    from moska.pd.cluster import free_port
    from moska.pd.transport import KVTransport, TransferEndpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/pd_transfer.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="512 tokens, 4 layers, CPU")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.tokens, args.layers, args.device, args.repeats = 512, 4, "cpu", 2
        if args.out == "bench/results/pd_transfer.json":
            args.out = "bench/results/pd_transfer_cpu.json"
    dtype = getattr(torch, args.dtype)
    n = args.tokens // args.block_size
    shape = (2, n, args.block_size, args.kv_heads, args.head_dim)
    layers = [torch.randn(shape, device=args.device).to(dtype) for _ in range(args.layers)]
    nbytes = sum(t.numel() * t.element_size() for t in layers)

    port = free_port()
    ranks = [KVTransport(TransferEndpoint("127.0.0.1", port, r, 2, 60.0)) for r in range(2)]
    threads = [threading.Thread(target=r.connect) for r in ranks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    ranks[1].start_receiving([0])
    times, exact = [], True
    try:
        for rep in range(args.repeats):
            done = threading.Event()
            result: dict = {}

            def finished(err, _s, result=result, done=done) -> None:
                result["e"] = err
                done.set()

            t0 = time.perf_counter()
            ranks[0].send(rep, 1, {"tokens": []}, layers, finished)
            arrival = ranks[1].wait_arrival(rep, 120.0)
            times.append(time.perf_counter() - t0)
            assert done.wait(60) and result["e"] is None, result
            exact = exact and all(torch.equal(a, b.cpu()) for a, b in zip(arrival.layers, layers))
    finally:
        for t in ranks:
            t.close()
    host = [t.cpu() for t in layers]
    dst = [torch.empty_like(t) for t in host]
    t0 = time.perf_counter()
    for a, b in zip(dst, host):
        a.copy_(b)
    copy_s = time.perf_counter() - t0
    best = min(times)
    report = {
        "benchmark": "pd_transfer",
        "environment": environment(),
        "config": vars(args) | {"layer_shape": list(shape), "bytes": nbytes},
        "seconds": times,
        "summary": {
            "transfer_s": round(best, 5),
            "per_layer_ms": round(best / args.layers * 1e3, 3),
            "gb_per_s": round(nbytes / best / 1e9, 3),
            "host_copy_gb_per_s_baseline": round(nbytes / copy_s / 1e9, 3),
            "exact": exact,
        },
    }
    write_json(args.out, report)
    print(report["summary"], f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
