"""How 2 GPUs of this host are linked, and what the collectives of one tensor-parallel decode
step cost there (NCCL, one process per GPU).

A TP = 2 decode step of `--layers` Llama layers moves, per row: 2 * layers + 1 all-reduces
of [B, H] in the model's dtype (o_proj and down_proj of each layer, the vocab-parallel
embedding) and the LM head's output to rank 0: before session 14 the logits, a gather of
[B, V / 2] (32 MB at B = 256, V = 128K, bf16: as much as all the all-reduces of 8 layers),
now (every row greedy) the argmax gather of [B, 2] float64. Each is timed with CUDA events
over `--iters` back-to-back calls; `step_comm_ms` adds them up as a step does, and
`graphed_all_reduces_ms` times the step's all-reduces captured in one CUDA graph (NCCL's
transports that need its proxy thread may cost more there). Also: whether
CUDA sees peer access between the GPUs (without it NCCL goes through host memory).

GPU (2 GPUs):  python3 bench/nccl_link_probe.py --out $OUT/nccl_link_probe.json
CPU (gloo, the same sizes):  .venv/bin/python bench/nccl_link_probe.py --cpu --iters 10
(NCCL_DEBUG=INFO on the command line prints NCCL's transport per channel, "via P2P/..." or
"via SHM/...".)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, iters: int, cuda: bool) -> float:
    """ms per call of fn, both ranks calling it back to back."""
    for _ in range(3):
        fn()
    if not cuda:
        dist.barrier()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _graphed(fn, iters: int) -> float | None:
    """ms per replay of a CUDA graph of fn (NCCL collectives captured, as in a TP step)."""
    from moska.bench.common import capture_graph

    try:
        replay = capture_graph(fn)  # one warm-up on a side stream, then the capture
    except RuntimeError as e:  # both ranks fail alike: the eager rows still come back
        print("graph capture failed:", e, flush=True)
        return None
    return _time(replay, max(1, iters // 5), True)


def _rank(rank: int, port: int, a, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not a.cpu
    if cuda:
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=rank, world_size=2, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=2)
    dt = torch.bfloat16
    rows: dict = {}
    xs: dict = {}
    for b in a.batch:
        x = torch.randn(b, a.hidden, device=dev, dtype=dt)
        local = torch.randn(b, a.vocab // 2, device=dev, dtype=dt)
        pair = torch.randn(b, 2, device=dev, dtype=torch.float64)
        into = [torch.empty_like(local) for _ in range(2)] if rank == 0 else None
        into2 = [torch.empty_like(pair) for _ in range(2)] if rank == 0 else None
        ar = _time(lambda x=x: dist.all_reduce(x), a.iters, cuda)
        gl = _time(lambda t=local, o=into: dist.gather(t, o, dst=0), a.iters, cuda)
        ga = _time(lambda t=pair, o=into2: dist.gather(t, o, dst=0), a.iters, cuda)
        n = 2 * a.layers + 1
        xs[b] = x
        rows[f"b{b}"] = {
            "all_reduce_ms": round(ar, 4),
            "all_reduce_bytes": x.numel() * x.element_size(),
            "all_reduce_GBps_algbw": round(x.numel() * x.element_size() / ar / 1e6, 1),
            "gather_logits_ms": round(gl, 4),
            "gather_logits_bytes_per_rank": local.numel() * local.element_size(),
            "gather_logits_GBps": round(local.numel() * local.element_size() / gl / 1e6, 1),
            "gather_argmax_ms": round(ga, 4),
            "all_reduces_per_step": n,
            "step_comm_ms_logits_gather": round(n * ar + gl, 3),
            "step_comm_ms_argmax_gather": round(n * ar + ga, 3),
            "graphed_all_reduces_ms": None,
        }
    peer = torch.cuda.can_device_access_peer(0, 1) if cuda else None
    if rank == 0:  # the eager figures first: a capture that breaks leaves them
        Path(out).write_text(json.dumps({"peer_access": peer, "rows": rows}))
        print("eager:", json.dumps(rows), flush=True)
    for b, x in xs.items() if cuda else ():
        steps = [dist.all_reduce] * (2 * a.layers + 1)  # the step's all-reduces in a row

        def all_reduces(x=x, steps=steps) -> None:
            for f in steps:
                f(x)

        # captured in one CUDA graph, as a TP decode step runs them
        graphed = _graphed(all_reduces, a.iters)
        rows[f"b{b}"]["graphed_all_reduces_ms"] = None if graphed is None else round(graphed, 3)
        if rank == 0:
            Path(out).write_text(json.dumps({"peer_access": peer, "rows": rows}))
    dist.barrier()
    dist.destroy_process_group()


def _summary(rows: dict) -> dict:
    keys = ("all_reduce_ms", "gather_logits_ms", "gather_argmax_ms", "graphed_all_reduces_ms",
            "step_comm_ms_logits_gather", "step_comm_ms_argmax_gather")  # fmt: skip
    return {f"{b}_{k}": r[k] for b, r in rows.items() for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (host copies over TCP)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="--cpu with small sizes")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.cpu_dry_run:
        a.cpu, a.hidden, a.vocab, a.iters = True, 256, 4096, 5
    from moska.bench.common import environment, write_json

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="moska-nccl-") as tmp:
        f = os.path.join(tmp, "rows.json")
        try:
            mp.spawn(_rank, args=(port, a, f), nprocs=2)
        except Exception as e:  # noqa: BLE001 - keep what was measured before it
            print("probe failed:", e, flush=True)
        got = json.loads(Path(f).read_text())
    result = {
        "bench": "nccl_link_probe",
        "env": environment(),
        "device": "cpu (gloo)" if a.cpu else "cuda x2",
        "dtype": "bfloat16",
        "shapes": {"batch": a.batch, "hidden": a.hidden, "vocab": a.vocab, "layers": a.layers},
        **got,
        "summary": {"peer_access": got["peer_access"], **_summary(got["rows"])},
    }
    print("summary:", json.dumps(result["summary"]))
    if a.out:
        print("wrote", write_json(a.out, result))


if __name__ == "__main__":
    main()
