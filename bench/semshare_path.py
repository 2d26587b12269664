"""SemShareKV's reuse path alone, stage by stage: where a reused prefill's time goes.

One original document (held-out code, `semshare_speed.documents`) is computed in full and
stored as a reference; then each near-duplicate variant (renamed, reordered, reworded) is
planned (features, LSH lookup, token matching) and blended (`blend_prefill`), each stage
timed on its own, against a plain prefill of the same prompt (`blend.extend`) in the same
run. Host syncs are counted per stage: calls that wait on the device (`.item()`,
`.tolist()`, `int()`/`bool()` of a tensor, `nonzero`, `unique`, `.cpu()`, boolean-mask
indexing, ...) counted by a TorchFunctionMode on any device, and on CUDA also the syncs
`torch.cuda.set_sync_debug_mode` reports. On a GPU each sync stalls the launch queue, and
a 30 ms prefill cannot hide a few hundred of them.

The model is moska-code-20m by default (its real embeddings make the matches realistic),
or `--arch` for a random-weight Llama of that shape (`semshare_speed.ARCHS`).

CPU: .venv/bin/python bench/semshare_path.py --prompt 5120
GPU: python3 bench/semshare_path.py --device cuda --arch 1b --model .models/moska-code-20m \
         --out $OUT/semshare_path_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Self

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import semshare_speed as ss

from moska.attention.kv_cache import PagedKVCache
from moska.bench.common import environment
from moska.host_syncs import count_host_syncs
from moska.kernel_ops import kernel_ops
from moska.model import load_model
from moska.semshare import blend
from moska.semshare import reuse as reuse_mod
from moska.semshare.config import SemShareConfig
from moska.semshare.reuse import SemanticReuse
from moska.semshare.store import prompt_key


class Stage:
    """Wall time (device-synced) of one stage; with `count`, its host syncs instead (the
    counting mode costs Python time per torch call: counted runs are not timed runs)."""

    def __init__(self, device: torch.device, count: bool = False) -> None:
        self.device, self.count = device, count
        self.ms = self.cpu_ms = 0.0  # wall (device-synced) and this process's CPU time
        self.syncs: Counter | None = None

    def __enter__(self) -> Self:
        self._sync()
        if self.count:
            # on a GPU only calls on a GPU tensor count; on the CPU every such call counts (it
            # would sync were its tensor on a GPU) but `.cpu()` of a host tensor: the LSH
            # index's tensors are on the host in every run
            self._counting = count_host_syncs(
                device_only=self.device.type != "cpu", host_copies=False
            )
            self._mode = self._counting.__enter__()
            self._warn = warnings.catch_warnings(record=True)
            self._log = self._warn.__enter__()
            warnings.simplefilter("always")
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(1)
        self._t, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.ms = 1000 * (time.perf_counter() - self._t)
        self.cpu_ms = 1000 * (time.process_time() - self._cpu)
        if not self.count:
            return
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        self._counting.__exit__(*exc)
        self._warn.__exit__(*exc)
        self.syncs = self._mode.counts
        cuda = sum("synchroniz" in str(w.message) for w in self._log)
        if cuda:
            self.syncs["cuda (debug mode)"] = cuda

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def row(self) -> dict:
        row = {"ms": round(self.ms, 3), "cpu_ms": round(self.cpu_ms, 3)}
        if self.syncs is not None:  # counted: its times include the counting
            row.update(syncs=sum(self.syncs.values()), **self.syncs)
        return row


class Substages:
    """Device-synced wall time of the reuse path's pieces, by patching them (adds syncs:
    run without it for clean totals)."""

    def __init__(self, device: torch.device, reuse: SemanticReuse) -> None:
        self.device = device
        self.ms: Counter = Counter()
        self.active = True  # off for the plain-prefill baseline, which shares RowAttention
        reuse.features = self.wrap("features", reuse.features)  # type: ignore[method-assign]
        reuse.store.lookup = self.wrap("lsh_lookup", reuse.store.lookup)  # type: ignore
        reuse_mod.match_tokens = self.wrap("match_tokens", reuse_mod.match_tokens)
        blend._copy_reference = self.wrap("rerotate_and_gather", blend._copy_reference)
        blend._select = self.wrap("select_rows", blend._select)
        blend.RowAttention.__call__ = self.wrap("row_attention", blend.RowAttention.__call__)

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            if not self.active:
                return fn(*a, **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t = time.perf_counter() if self.device.type == "cuda" else time.process_time()
            out = fn(*a, **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.ms[name] += 1000 * (time.perf_counter() - t)
            else:  # CPU time of this process: steadier than wall time on a shared host
                self.ms[name] += 1000 * (time.process_time() - t)
            return out

        return timed


def torch_profile(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)


def load(args, device):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.arch is None:
        return load_model(args.model, dtype=dtype, device=device)
    # random weights; only the tokenizer of --model (a device may carry no weights)
    return ss.random_loaded(args.arch, Path(args.model), args.prompt + 64, dtype, str(device))


def run(args) -> dict:
    device = torch.device(args.device)
    loaded = load(args, device)
    model, tok = loaded.model, loaded.tokenizer
    model.kernels = kernel_ops("auto", device)  # the engine's table (Triton on a GPU)
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
    cfg = SemShareConfig(
        store_bytes=1 << 40, row_granule=args.row_granule, cuda_graphs=not args.no_graphs
    )
    reuse = SemanticReuse(cfg, model, cache)
    original = torch.tensor(ss.join(tok, parts, "original", 0, by_dir, args.prompt))
    t = time.perf_counter()
    warm_buckets = reuse.warm_up(args.prompt)  # as the engine does at start (CUDA only)
    warm_up_s = time.perf_counter() - t
    with torch.inference_mode():
        blend.extend(model, cache, ref_table, original[:32], 0)  # warm-up
        stages = {"full_prefill_original": Stage(device), "record": Stage(device)}
        count = {"record_syncs": Stage(device, count=True)}
        with stages["full_prefill_original"]:
            blend.extend(model, cache, ref_table, original, 0)
        with stages["record"]:
            reuse.store.put(reuse.reference(prompt_key(original), original, ref_table))
        with count["record_syncs"]:  # the same again under another key, syncs counted
            reuse.store.put(reuse.reference("again", original, ref_table))
    subs = Substages(device, reuse) if args.substages else None
    rows = []
    for kind in args.kinds:
        for rep in range(args.repeats + 1):  # the first may pay one-off costs: kept apart
            ids_list = ss.join(tok, parts, kind, 100 + rep, by_dir, args.prompt)
            ids = torch.tensor(ids_list)
            # the first repetition counts syncs (and pays any one-off costs), the rest time
            st = {k: Stage(device, rep == 0) for k in ("plan", "blend", "full_prefill")}
            st["blend_again"] = Stage(device)  # the same blend again: every shape seen
            if subs is not None:
                subs.ms.clear()
            prof = torch_profile(device) if args.torch_profile and rep == 1 else None
            with prof or contextlib.nullcontext():
                with st["plan"]:
                    plan = reuse.plan(ids_list)
                if plan is None:
                    print(f"{kind}: no plan", flush=True)
                    continue
                with st["blend"]:
                    res = blend.blend_prefill(
                        model, cache, new_table, ids[:-1], 0, plan.ref, plan.ref_pos[:-1],
                        reuse.config.recompute_fraction, reuse.config.recompute_layers,
                        granule=reuse.granule, graphs=reuse.graphs,
                    )  # fmt: skip
            if prof is not None:
                by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=by, row_limit=40)
                Path(args.torch_profile).parent.mkdir(parents=True, exist_ok=True)
                with open(args.torch_profile, "a") as f:
                    f.write(f"== {kind} (plan + blend) ==\n{table}\n")
            sub_ms = dict(subs.ms) if subs is not None else {}  # plan + blend only
            if subs is not None:
                subs.active = False
            with torch.inference_mode(), st["blend_again"]:
                blend.blend_prefill(
                    model, cache, new_table, ids[:-1], 0, plan.ref, plan.ref_pos[:-1],
                    reuse.config.recompute_fraction, reuse.config.recompute_layers,
                    granule=reuse.granule, graphs=reuse.graphs,
                )  # fmt: skip
            if reuse.graphs is not None:  # control: the same blend with no graph
                st["blend_eager"] = Stage(device)
                with torch.inference_mode(), st["blend_eager"]:
                    blend.blend_prefill(
                        model, cache, new_table, ids[:-1], 0, plan.ref, plan.ref_pos[:-1],
                        reuse.config.recompute_fraction, reuse.config.recompute_layers,
                        granule=reuse.granule,
                    )  # fmt: skip
            if subs is not None:
                subs.active = True
            if not args.skip_baseline:
                if subs is not None:
                    subs.active = False  # the baseline untimed piecewise (no added syncs)
                with torch.inference_mode(), st["full_prefill"]:
                    blend.extend(model, cache, new_table, ids[:-1], 0)
                if subs is not None:
                    subs.active = True
            row = {"kind": kind, "seed": 100 + rep, "first": rep == 0, "tokens": len(ids_list)}
            row.update({k: v.row() for k, v in st.items() if v.ms or k != "full_prefill"})
            if subs is not None:
                row["substages_ms"] = {k: round(v, 3) for k, v in sub_ms.items()}
            row["matched"] = plan.num_matched
            row["reused"], row["recomputed"] = res.num_reused, res.num_recomputed
            rows.append(row)
            print(json.dumps(row), flush=True)
    warm = [r for r in rows if not r["first"]]
    summary: dict = {
        k: {
            "ms_median": round(statistics.median(r[k]["ms"] for r in warm), 2),
            "cpu_ms_median": round(statistics.median(r[k]["cpu_ms"] for r in warm), 2),
            "first_ms_max": round(max(r[k]["ms"] for r in rows if r["first"]), 2),
            "syncs_max": max(r[k].get("syncs", 0) for r in rows if r["first"]),
        }
        for k in ("plan", "blend", "blend_again")
        + (("blend_eager",) if reuse.graphs is not None else ())
        + (() if args.skip_baseline else ("full_prefill",))
    }
    if subs is not None:
        names = sorted({n for r in warm for n in r["substages_ms"]})
        summary["substages_ms_median"] = {
            n: round(statistics.median(r["substages_ms"].get(n, 0.0) for r in warm), 3)
            for n in names
        }
    summary["record"] = stages["record"].row()
    summary["record"]["syncs"] = count["record_syncs"].row()["syncs"]
    summary["warm_up"] = {"buckets": warm_buckets, "s": round(warm_up_s, 3)}
    g = reuse.graphs
    summary["graphs"] = None if g is None else {"captured": len(g), "replays": g.replays}
    summary["row_counts"] = sorted({r["recomputed"] for r in rows})
    summary["reused_share"] = round(statistics.mean(r["reused"] / r["tokens"] for r in warm), 3)
    return {
        "bench": "semshare_path",
        "env": environment(),
        "model": args.model if args.arch is None else f"random llama {args.arch}",
        "dtype": args.dtype,
        "device": str(device),
        "shapes": {"prompt": args.prompt, "kinds": args.kinds, "repeats": args.repeats},
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "semshare": reuse.config.__dict__,
        "summary": summary,
        "original": {k: v.row() for k, v in stages.items()},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--arch", default=None, choices=sorted(ss.ARCHS), help="random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    ap.add_argument("--prompt", type=int, default=5120)
    ap.add_argument("--kinds", nargs="+", default=list(ss.KINDS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--source", default="auto", choices=("auto", "heldout", "stdlib"))
    ap.add_argument("--profile", default=None, help="write a cProfile of the run here")
    ap.add_argument("--torch-profile", default=None, help="append torch.profiler tables here")
    ap.add_argument("--substages", action="store_true", help="time the path's pieces too")
    ap.add_argument("--skip-baseline", action="store_true", help="no plain prefill (CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--row-granule", type=int, default=SemShareConfig.row_granule)
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs past the boundary")
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_path.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(run, args)
        prof.dump_stats(args.profile)
    else:
        result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
