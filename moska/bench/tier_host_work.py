"""Host work of a tiered library's read, per layer: the host syncs and device ops its own
bookkeeping adds to the grouped kernel's (the kernel itself is left out: it is the same
launch as the all-resident library's). Counted, not timed, so it runs on CPU too.

Why: on the H200 the tiered path with every chunk resident ran 0.44-0.63x of the
all-resident step (bench/results/tiers_h200_s14.json, `allhit-wait`), before any copy: a
host sync per layer drains the launch queue and the GPU waits on the host's bookkeeping.
This counts what is left of it per mode, in the tiers benchmark's modes:
- `allhit-wait`: every chunk in its slot, the "wait" policy;
- `hits-wait`: a quarter of the chunks in slots, routing among them only ("wait" still reads
  each layer's chunks on the host: it cannot know they are resident);
- `resident-only`: the same through `attend_resident` (residency-biased routing, eps = inf);
- `skip-step`: the "skip" policy under `sync="step"` with misses (fetched for later steps).

    python -m moska.bench.tier_host_work --out /tmp/tier_host_work.json   # CPU
    python -m moska.bench.tier_host_work --device cuda                    # counted on a GPU
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moska.bench.common import write_json
from moska.host_syncs import count_host_syncs, uncounted
from moska.kernels.selections import from_topk
from moska.library.chunk_store import MemoryChunks
from moska.library.tiers import ChunkTiers, TierConfig

MODES = ("allhit-wait", "hits-wait", "resident-only", "skip-step")
_NO_LAUNCH = frozenset(
    {"empty", "empty_strided", "empty_like", "_local_scalar_dense", "lift_fresh"}
)


class DeviceOps(TorchDispatchMode):
    """Counts aten ops that would launch on the device (views and allocations excluded);
    `cuda_only`: only ops with a CUDA tensor argument (host-side edits are not launches)."""

    def __init__(self, cuda_only: bool) -> None:
        super().__init__()
        self.cuda_only = cuda_only
        self.counts: Counter[str] = Counter()
        self.pause = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.pause or func.is_view or name in _NO_LAUNCH:
            return out
        leaves = [*args, *(kwargs or {}).values()]
        if self.cuda_only and not any(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves):
            return out
        self.counts[name] += 1
        return out


def _stub_ops(ops, counter: DeviceOps):
    """`ops` whose grouped kernel is left out of both counts."""
    kernel = uncounted(ops.grouped_shared)

    def grouped_shared(*args, **kwargs):
        counter.pause += 1
        try:
            return kernel(*args, **kwargs)
        finally:
            counter.pause -= 1

    return replace(ops, grouped_shared=grouped_shared)


def measure(mode: str, device: torch.device, ops, layers=4, chunks=8, batch=8, top_k=2,
            steps=4, hkv=2, d=16, chunk_len=32) -> dict:  # fmt: skip
    """Per layer and step (steps after one warmup step): host syncs and device ops by name."""
    torch.manual_seed(0)
    s = chunks * chunk_len
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pin = device.type == "cuda"
    k = [torch.randn(s, hkv, d, dtype=dtype).pin_memory() if pin else torch.randn(s, hkv, d,
         dtype=dtype) for _ in range(layers)]  # fmt: skip
    v = [torch.randn(s, hkv, d, dtype=dtype).pin_memory() if pin else torch.randn(s, hkv, d,
         dtype=dtype) for _ in range(layers)]  # fmt: skip
    offs = [i * chunk_len for i in range(chunks + 1)]
    slots = chunks if mode == "allhit-wait" else max(top_k, chunks // 4)
    miss = "skip" if mode == "skip-step" else "wait"
    sync = {"sync": "step"} if "sync" in TierConfig.__dataclass_fields__ else {}  # before: none
    cfg = TierConfig(gpu_budget="1", miss_policy=miss, **sync)
    tiers = ChunkTiers(offs, MemoryChunks(k, v), cfg, device, slots, 1)
    if mode != "skip-step":
        for layer in range(layers):
            tiers.prefetch(layer, list(range(slots)))  # chunks 0 .. slots-1 resident
    pool = slots if mode in ("hits-wait", "resident-only") else chunks  # what routing picks
    q = torch.randn(batch, 2 * hkv, d, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)

    def routed() -> torch.Tensor:  # [B, 1, k] distinct chunks per request
        rows = [torch.randperm(pool, generator=g)[:top_k] for _ in range(batch)]
        return torch.stack(rows).unsqueeze(1).to(device)

    sels = [[from_topk(routed(), hkv, chunks) for _ in range(layers)] for _ in range(steps + 1)]
    counter = DeviceOps(cuda_only=device.type == "cuda")
    stub = _stub_ops(ops, counter)
    read = tiers.attend_resident if mode == "resident-only" else tiers.attend
    for step, per_layer in enumerate(sels):
        if step == 1:
            getattr(tiers, "flush", lambda: None)()
            if device.type == "cuda":
                torch.cuda.synchronize()
            syncs_cm = count_host_syncs(device_only=device.type == "cuda")
            syncs = syncs_cm.__enter__()
            counter.__enter__()
        for layer, sel in enumerate(per_layer):
            read(stub, layer, q, sel, d**-0.5)
    counter.__exit__(None, None, None)
    syncs_cm.__exit__(None, None, None)
    n = steps * layers
    return {
        "mode": mode,
        "host_syncs_per_layer": syncs.n / n,
        "device_ops_per_layer": sum(counter.counts.values()) / n,
        "syncs": dict(syncs.counts),
        "ops": dict(counter.counts),
        "layer_steps": n,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from moska.kernel_ops import kernel_ops

    device = torch.device(a.device)
    ops = kernel_ops("torch" if device.type == "cpu" else "triton")
    rows = [measure(m, device, ops) for m in MODES]
    for r in rows:
        print({k: r[k] for k in ("mode", "host_syncs_per_layer", "device_ops_per_layer")})
    result = {
        "benchmark": "tier_host_work",
        "device": a.device,
        "rows": rows,
        "summary": {
            r["mode"]: [r["host_syncs_per_layer"], r["device_ops_per_layer"]] for r in rows
        },
        "notes": "per layer read beyond the grouped kernel's own launches: [host syncs, "
        "device ops]; the per-step settle (one counts copy, one clear) is included, spread "
        "over the layers",
    }
    if a.out:
        write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
