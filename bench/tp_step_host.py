"""Host cost of tensor parallelism's per-step metadata: what rank 0 sends the other ranks
before a decode step (`distributed/step_channel.py`) and their receiving it, without the
model, on 2 gloo CPU processes.

Per step rank 0 sends a decode FORWARD of B rows with `--blocks` blocks each (ids,
positions, slots, cu_q_lens, seq_lens, block tables) and then asks for the logits of every
row, exactly as the engine does; rank 1 receives both. Counted per step: the broadcasts
(torch.distributed.broadcast calls on rank 1) and the wall ms of rank 1's receive loop
(median over `--steps`, after a warm-up). Works on any version of the channel: when
`send_forward` takes `logits_follow` the logits request rides in the FORWARD header.

CPU (this is a host measurement):  .venv/bin/python bench/tp_step_host.py --out X.json
"""

from __future__ import annotations

import argparse
import inspect
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


class _Bound:  # what send_forward reads of a bound attention
    def __init__(self, meta) -> None:
        self.meta = meta


def _step_inputs(b: int, blocks: int, step: int):
    from moska.attention.metadata import AttentionMetadata

    g = torch.Generator().manual_seed(step)
    meta = AttentionMetadata(
        slot_mapping=torch.randint(0, 1 << 20, (b,), generator=g),
        cu_q_lens=torch.arange(b + 1, dtype=torch.int32),
        seq_lens=torch.randint(1, blocks * 16, (b,), generator=g, dtype=torch.int32),
        block_tables=torch.randint(0, 1 << 16, (b, blocks), generator=g, dtype=torch.int32),
        decode_only=True,
    )
    return torch.randint(0, 1 << 17, (b,), generator=g), torch.randint(0, 1 << 12, (b,)), meta


def _rank(rank: int, store: str, a, out: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from moska.distributed.comm import Collectives
    from moska.distributed.step_channel import Command, StepChannel

    control = dist.new_group(backend="gloo")
    comm = Collectives(None, rank, 2, "gloo")
    ch = StepChannel(comm, control, torch.device("cpu"), 64, torch.float32)
    follow = "logits_follow" in inspect.signature(ch.send_forward).parameters
    calls = [0]
    real = dist.broadcast

    def counted(*args, **kw):
        calls[0] += 1
        return real(*args, **kw)

    dist.broadcast = counted  # type: ignore[assignment]
    rows = []
    for b in a.batch:
        inputs = [_step_inputs(b, a.blocks, s) for s in range(4)]
        times, per_step = [], []
        for s in range(a.warmup + a.steps):
            ids, pos, meta = inputs[s % 4]
            calls[0] = 0
            dist.barrier(control)
            t = time.perf_counter()
            if rank == 0:
                kw = {"logits_follow": True} if follow else {}
                ch.send_forward(ids, pos, _Bound(meta), **kw)
                ch.send_logits(ids, same_as_forward=True)
            else:
                msg = ch.recv()
                assert msg.command is Command.FORWARD and msg.meta is not None
                assert torch.equal(msg.meta.block_tables, meta.block_tables)
                if not getattr(msg, "logits_follow", False):
                    assert ch.recv().command is Command.LOGITS_LAST
            dt = time.perf_counter() - t
            if s >= a.warmup:
                times.append(dt * 1e3)
                per_step.append(calls[0])
        if rank == 1:
            rows.append({
                "batch": b, "blocks": a.blocks, "int64_per_step": b * (5 + a.blocks) + 1,
                "broadcasts_per_step": statistics.median(per_step),
                "recv_ms_median": round(statistics.median(times), 3),
                "recv_ms_p90": round(sorted(times)[int(0.9 * len(times))], 3),
                "logits_in_forward_header": follow,
            })  # fmt: skip
    if rank == 0:
        ch.send_stop()
    else:
        assert ch.recv().command is Command.STOP
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 256])
    ap.add_argument("--blocks", type=int, default=64, help="KV blocks per row (1K tokens)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from moska.bench.common import environment, write_json

    with tempfile.TemporaryDirectory(prefix="moska-steph-") as tmp:
        rows_file = os.path.join(tmp, "rows.json")
        mp.spawn(_rank, args=(os.path.join(tmp, "store"), a, rows_file), nprocs=2)
        rows = json.loads(Path(rows_file).read_text())
    for r in rows:
        print(r, flush=True)
    result = {
        "bench": "tp_step_host",
        "label": a.label,
        "env": environment(),
        "device": "cpu",
        "backend": "gloo",
        "load_average": os.getloadavg(),
        "shapes": {"batch": a.batch, "blocks": a.blocks, "steps": a.steps},
        "rows": rows,
        "summary": {f"b{r['batch']}_recv_ms": r["recv_ms_median"] for r in rows}
        | {f"b{r['batch']}_broadcasts": r["broadcasts_per_step"] for r in rows},
    }
    print("summary:", json.dumps(result["summary"]))
    if a.out:
        print("wrote", write_json(a.out, result))


if __name__ == "__main__":
    main()
