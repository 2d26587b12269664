"""SemShareKV's reuse path, counted: device kernel launches (aten ops that are not views)
and host syncs per stage, and the host's Python time per stage, on the CPU.

Why counts: on a GPU a 5K-token blend's compute is ~7 ms, so the path is fast only if the
host launches its ops faster than the device runs them and never stops to wait (a sync
drains the queue, and the device then idles while the host launches the next op). Both are
properties of the code, not of the device: counted here, on a CPU, with a TorchDispatchMode
that sees every aten op. A sync is an op whose result the host must read (`nonzero`,
`_local_scalar_dense` of `.item()`/`int()`, `unique`, `masked_select`, a device-to-host or
host-to-device copy, `repeat_interleave` without an output size). On the CPU every tensor is
a host tensor, so copies cannot be told apart: `_to_copy`/`copy_` between devices count
only on a GPU run (`--device cuda`).

Stages: the plan (features, LSH lookup, token matching) and the blend (re-rotation and
gather of the reference KV, row selection, row attention, the rest = the layers' own ops).

CPU: .venv/bin/python bench/semshare_launches.py --prompt 1024
`--graphs`: the layers past the boundary through `BlendGraphs`, counted as the one launch
their CUDA graph replay is on a GPU (`moska/semshare/graphs.py`).
GPU: python3 bench/semshare_launches.py --device cuda --arch 1b --model .models/moska-code-20m
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_speed as ss
from semshare_path import load

from moska.attention.kv_cache import PagedKVCache
from moska.bench.common import environment
from moska.kernel_ops import kernel_ops
from moska.semshare import blend
from moska.semshare import reuse as reuse_mod
from moska.semshare.config import SemShareConfig
from moska.semshare.graphs import BlendGraphs
from moska.semshare.reuse import SemanticReuse
from moska.semshare.store import prompt_key

_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "as_strided",
    "unsqueeze", "squeeze", "permute", "alias", "detach", "split", "unbind", "unfold",
    "_reshape_alias", "lift_fresh", "empty", "empty_strided", "chunk", "narrow",
    "split_with_sizes", "_has_compatible_shallow_copy_type", "view_as_real",
}  # fmt: skip
_SYNCS = {"nonzero", "_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive",
          "masked_select", "repeat_interleave"}  # fmt: skip
_REPLAYED = "_in_graph_replay"


class Counting(TorchDispatchMode):
    """Per stage (innermost wrapped call running): launches, syncs, by op name."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stack = ["other"]
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()
        self.ops: dict[str, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeImplicitAutograd"
        ):  # seen here under inference mode: count its decomposition's ops instead
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        stage = self.stack[-1]
        if _REPLAYED in self.stack:  # inside a graph replay's stand-in: counted there, once
            return func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name not in _VIEWS:
            self.launches[stage] += 1
            self.ops.setdefault(stage, Counter())[name] += 1
        sync = name in _SYNCS
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            sync = False
        if name in ("_to_copy", "copy_") and self.device.type != "cpu":
            devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            out_dev = kwargs.get("device")
            sync = len(devs | ({out_dev.type} if out_dev is not None else set())) > 1
        if sync:
            self.syncs[stage] += 1
        return func(*args, **kwargs)


def as_replay(counting: Counting, times: Counter, fn):
    """`BlendGraphs.tail` counted as the one launch its CUDA graph replay is on a GPU (on
    the CPU it runs eagerly, its ops uncounted)."""

    def replayed(*a, **kw):
        counting.launches["graph_replay"] += 1
        counting.stack.append(_REPLAYED)
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            times["graph_replay"] += 1000 * (time.perf_counter() - t)
            counting.stack.pop()

    return replayed


def wrap(counting: Counting, times: Counter, name: str, fn):
    def counted(*a, **kw):
        counting.stack.append(name)
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            times[name] += 1000 * (time.perf_counter() - t)
            counting.stack.pop()

    return counted


def run(args) -> dict:
    device = torch.device(args.device)
    loaded = load(args, device)
    model, tok = loaded.model, loaded.tokenizer
    model.kernels = kernel_ops("auto", device)
    c = model.config
    docs, by_dir = ss.documents(tok, 1, args.prompt, args.source)
    if not docs:
        raise SystemExit("no document of that many tokens")
    parts = docs[0]
    blocks = -(-args.prompt // 16) + 1
    cache = PagedKVCache(
        c.num_kv_layers, 2 * blocks, 16, c.num_kv_heads, c.head_dim, model.dtype, device
    )
    ref_table, new_table = list(range(blocks)), list(range(blocks, 2 * blocks))
    reuse = SemanticReuse(SemShareConfig(store_bytes=1 << 40), model, cache)
    original = torch.tensor(ss.join(tok, parts, "original", 0, by_dir, args.prompt))
    with torch.inference_mode():
        blend.extend(model, cache, ref_table, original, 0)
        reuse.store.put(reuse.reference(prompt_key(original), original, ref_table))
    counting = Counting(device)
    times: Counter = Counter()
    w = lambda name, fn: wrap(counting, times, name, fn)
    reuse.features = w("features", reuse.features)  # type: ignore[method-assign]
    reuse.store.lookup = w("lsh_lookup", reuse.store.lookup)  # type: ignore[method-assign]
    reuse_mod.match_tokens = w("match_tokens", reuse_mod.match_tokens)
    blend._copy_reference = w("rerotate_and_gather", blend._copy_reference)
    blend._select = w("select_rows", blend._select)
    blend.RowAttention.__call__ = w("row_attention", blend.RowAttention.__call__)
    graphs = None
    if args.graphs:  # the layers past the boundary as the graph path runs them (one replay)
        cfg = reuse.config
        graphs = BlendGraphs(model, cache, cfg.recompute_layers, args.prompt, [], capture=False)
        graphs.tail = as_replay(counting, times, graphs.tail)  # type: ignore[method-assign]
    rows = []
    for kind in args.kinds:
        ids_list = ss.join(tok, parts, kind, 100, by_dir, args.prompt)
        ids = torch.tensor(ids_list)
        for counted in (False, True):  # a warm run first, then the counted one
            counting.launches.clear(), counting.syncs.clear(), counting.ops.clear()
            times.clear()
            with counting if counted else torch.inference_mode():
                t0 = time.perf_counter()
                counting.stack.append("plan_other")
                plan = reuse.plan(ids_list)
                counting.stack.pop()
                t1 = time.perf_counter()
                if plan is None:
                    break
                res = blend.blend_prefill(
                    model, cache, new_table, ids[:-1], 0, plan.ref, plan.ref_pos[:-1],
                    reuse.config.recompute_fraction, reuse.config.recompute_layers,
                    graphs=graphs,
                )  # fmt: skip
                t2 = time.perf_counter()
        if plan is None:
            print(f"{kind}: no plan", flush=True)
            continue
        stages = sorted(set(counting.launches) | set(times) | set(counting.syncs))
        row = {
            "kind": kind,
            "tokens": len(ids_list),
            "reused": res.num_reused,
            "recomputed": res.num_recomputed,
            "plan_ms_counted": round(1000 * (t1 - t0), 2),
            "blend_ms_counted": round(1000 * (t2 - t1), 2),
            "stages": {
                s: {
                    "launches": counting.launches[s],
                    "syncs": counting.syncs[s],
                    "host_ms_counted": round(times[s], 2),
                    "top_ops": dict(counting.ops.get(s, Counter()).most_common(6)),
                }
                for s in stages
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        s: {
            "launches": max(r["stages"].get(s, {}).get("launches", 0) for r in rows),
            "syncs": max(r["stages"].get(s, {}).get("syncs", 0) for r in rows),
        }
        for s in sorted({s for r in rows for s in r["stages"]})
    }
    return {
        "bench": "semshare_launches",
        "env": environment(),
        "model": args.model if args.arch is None else f"random llama {args.arch}",
        "dtype": args.dtype,
        "device": str(device),
        "shapes": {"prompt": args.prompt, "kinds": args.kinds},
        "graphs": args.graphs,
        "command": " ".join(sys.argv),
        "summary": summary,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--arch", default=None, choices=sorted(ss.ARCHS), help="random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--kinds", nargs="+", default=list(ss.KINDS))
    ap.add_argument("--source", default="auto", choices=("auto", "heldout", "stdlib"))
    ap.add_argument(
        "--graphs", action="store_true", help="layers past the boundary as one graph replay"
    )
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_launches_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
