"""FlexiCache speed and memory on an 8B-shaped random model (`python -m moska.bench.flexicache
--mode speed`): device KV bytes at equal batch, and decode tokens/s at the largest batch each
layout fits in a KV budget.

Full KV: the engine's paged cache (`PagedKVCache` layout) read by `paged_decode`, eager and
replayed from a CUDA graph (`flexicache_fullkv.py`: the strongest baseline). FlexiCache:
`FlexiKV` (compact per-head device pool over a pinned host copy) read by
`paged_decode_heads`. Both run the whole random Llama-3.1-8B-shaped model (bf16), one token
per sequence per step, over contexts of `--context` tokens. Random weights give no real
attention pattern, so which heads are stable is not measured here but set: a seeded
`--stable-fraction` of (layer, sequence, head) is stable (take it from the quality run),
the rest unstable (every page). Every `--r` steps stable heads re-rank and fetch promoted
pages from the host, inside the timed steps. `--rank centroid` (the default, as in the
quality run) ranks by mean keys kept on the device; `--rank mass` reads every key of the
layer from the host copy at a re-ranking; `--rank bound` by Quest bounds.

Churn: random keys would make a forced-stable head's top-K churn almost wholly at every
re-ranking, which a stable head cannot do (overlap >= threshold, else it is unstable).
`--churn F` (default 0.375) sets the share of K replaced per re-ranking: the ranking's
scores are computed (their cost is timed) and then (1 - F) K pages per head are held on
top and the rest drawn at random. 0.375 is the quality run's rate: moska-code-20m at K =
32, threshold 0.75 (`flexicache_quality_cpu.json`) fetched about 12 pages per stable head
per re-ranking, flips to unstable included. `--churn -1`: the ranking's own scores on
random keys (the first H200 run's case, about K per head). `--compare-churn F` adds a row
at the largest batch with churn F.

Where a step's time goes, per FlexiCache row: `step_ms_by_kind` (mean ms of plain steps,
steps that start a page, re-ranking steps), `host_issue_ms_median` (the host's time to
issue a step, up to the final wait: near `step_ms_median` means host-bound),
`host_syncs_per_step_by_kind` (waits on the device that torch's sync debug mode flags;
on the CPU dry run the host's reads of tensor values outside the reference attention
kernels, `flexicache/host_reads.py`; counted over `--r` * 2 untimed steps after the timed
ones), the bytes fetched per step and
`fetch_share_of_step` (CUDA events around each fetch: by default a kernel reading the
pinned host copy in place, `fetch_in_place`; if that fails, a host gather into pinned
staging and a copy up), and how many fetched pages had been dropped at the previous re-ranking
(`refetched_pages`) or were kept from their old slot without a fetch (`reused_pages`,
hysteresis: `--no-hysteresis` turns it off, `--spare-pages` leaves spare slots per head).

Rows: full KV (eager; `--lean`: only from a CUDA graph), FlexiCache at its batch and at
the largest batch (`--also-r 8d,16d`: again at other re-rank intervals, `d`: deferred
re-ranking, `flexicache/deferred.py`; `i`: deferred and spread, a slice of ceil(L / r)
layers re-ranked after each step), the optional compare rows,
full KV from a CUDA graph (`full_graph`, CUDA only) and eager again (`full_repeat`); the
summary takes the fastest. `--graph`: FlexiCache's plain steps replayed from a CUDA graph
(`flexicache_graph.py`). The timed steps are whole lcm(r, block size) periods, so the mean
weighs plain, page-start and re-ranking steps in their real proportion; the warmup covers
two re-rankings. `device_ms_by_kind` / `device_bound_step_ms` time every kind of step with
the host out of the way (`flexicache_timing`). FlexiCache rows' host copies are views of one
pinned buffer for the largest batch; after each row its store is freed (`after_release`)
and the JSON written with the rows so far (`partial`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from moska.bench import flexicache_fullkv as fullkv
from moska.bench import flexicache_timing as timing
from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model, write_json
from moska.bench.flexicache_graph import GraphSteps
from moska.bench.flexicache_summary import by_interval, summarize
from moska.flexicache import FlexiCacheConfig, deferred
from moska.flexicache.host_reads import uncounted
from moska.flexicache.store import FlexiKV
from moska.kernel_ops import kernel_ops

ROOT = Path(__file__).resolve().parents[2]
TINY = {**LLAMA_3_1_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip


class _Flexi:
    def __init__(self, store: FlexiKV, ops, sm) -> None:
        self.store, self.ops, self.sm = store, ops, sm

    def __call__(self, layer, q, k, v):
        return self.store.attend(layer, q, k, v, self.ops.paged_decode_heads, self.sm)


class _ChurnScores:
    """The store's page scores with `churn` of each head's K picks drawn at random per
    re-ranking: (1 - churn) K `hot` pages per head get a large bonus, the rest random."""

    def __init__(self, store: FlexiKV, hot: torch.Tensor, churn: float) -> None:
        self.scores, self.store = store._scores, store
        L, B, H, _ = hot.shape
        P = store.shape[3]
        n_hot = round((1 - churn) * hot.shape[-1])
        self.bonus = torch.zeros(L, B, H, P, device=store.device)
        self.bonus.scatter_(-1, hot[..., :n_hot].to(store.device), 1e3)

    def __call__(self, layer: int, q: torch.Tensor, sm_scale: float) -> torch.Tensor:
        s = self.scores(layer, q, sm_scale)
        return s + self.bonus[layer] + 10 * torch.rand(s.shape, device=s.device)


def _flexi_store(cfg, mc, batch, context, pages, bs, dtype, device, stable_fraction, seed, churn,
                 host, filled=False):  # fmt: skip
    L, H, D = mc.num_kv_layers, mc.num_kv_heads, mc.head_dim
    gen = torch.Generator().manual_seed(seed)
    force = torch.rand(L, batch, H, generator=gen) < stable_fraction
    store = FlexiKV(
        cfg, num_layers=L, batch=batch, num_kv_heads=H, head_dim=D, block_size=bs,
        max_pages=pages, dtype=dtype, device=device, force_stable=force, host=host,
        zero_copy=True if device.type == "cpu" else None,  # dry run: the kernel's path
    )  # fmt: skip
    tile_k = torch.randn(64, bs, D, generator=gen).to(dtype)
    tile_v = torch.randn(64, bs, D, generator=gen).to(dtype)
    reps = -(-pages // 64)
    for copy, tile in () if filled else ((store.host_k, tile_k), (store.host_v, tile_v)):
        full = tile.repeat(reps, 1, 1)[:pages]  # [P, bs, D]
        for layer in range(L):  # every page: a reused host buffer holds the last row's
            copy[layer].copy_(full.expand(batch, H, *full.shape))
    # page summaries: K hot pages per head with wide bounds (always ranked first, as a
    # stable head's are), the rest narrow: re-rankings find the same top-K and fetch little
    n_cand = -(-context // bs) - cfg.recent_pages
    hot = torch.rand(L, batch, H, n_cand, generator=gen).argsort(-1)[..., : cfg.top_k_pages]
    hot = hot + cfg.sink_pages
    for layer in range(L if cfg.rank_by == "bound" else 0):
        kmin = -torch.rand(batch, H, pages, D, generator=gen)
        kmax = torch.rand(batch, H, pages, D, generator=gen)
        idx = hot[layer][..., None].expand(-1, -1, -1, D)
        kmin.scatter_(2, idx, -4.0)
        kmax.scatter_(2, idx, 4.0)
        store.kmin[layer].copy_(kmin.to(dtype))
        store.kmax[layer].copy_(kmax.to(dtype))
    if cfg.rank_by == "centroid":  # random mean keys: the top-K churns at re-rankings
        store.kmean.copy_(0.25 * torch.randn(store.kmean.shape, generator=gen).to(dtype))
    store.top.copy_(hot)
    store.length = context
    if churn >= 0:
        store._scores = _ChurnScores(store, hot, churn)
    return store


def _kind(attn, bs: int, r: int) -> str:
    """The FlexiCache step just begun: "rerank", "page" (starts a page) or "plain"; spread
    re-ranking: "slice" (a step followed by its slice of layers' re-ranking)."""
    store = attn.store
    if store.rerank_spread and store.step > 0 and len(deferred.spread_layers(store)):
        return "slice"
    if store.step % r == 0:
        return "rerank"
    return "page" if (store.length - 1) % bs == 0 else "plain"


def _stepper(model, attn):
    """step(tokens) -> next tokens: one decode step of every sequence at the current length."""

    def step(tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.full(tokens.shape, attn.store.length - 1, device=tokens.device)
        out = model.compute_logits(model(tokens, pos, attn)).argmax(-1)
        attn.store.finish_step()  # a deferred re-ranking (`--deferred-rerank`)
        return out

    return step


def run(args, rest: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="flexicache --mode speed")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--kv-budget-gib", type=float, default=16.0)
    ap.add_argument("--top-k-pages", type=int, default=32)
    ap.add_argument("--stable-fraction", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=32,
                    help="timed decode steps, rounded up to whole lcm(r, block size) periods")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=16, help="untimed steps first (2 re-ranks)")
    ap.add_argument("--probes", type=int, default=16, help="device-only timed steps (CUDA)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--rank", choices=("centroid", "mass", "bound"), default="centroid")
    ap.add_argument("--no-hysteresis", action="store_true", help="free dropped pages' slots")
    ap.add_argument("--spare-pages", type=int, default=0, help="slots per head for dropped pages")
    ap.add_argument("--compare-hysteresis", action="store_true",
                    help="also the largest batch with hysteresis off")  # fmt: skip
    ap.add_argument("--churn", type=float, default=0.375,
                    help="share of K replaced per re-ranking (-1: the ranking's own)")  # fmt: skip
    ap.add_argument("--compare-churn", type=float, default=None,
                    help="also the largest batch with this churn")  # fmt: skip
    ap.add_argument("--graph", action="store_true", help="FlexiCache plain steps from a CUDA graph")
    ap.add_argument("--also-r", default="",
                    help="also the largest batch at these intervals (8d: deferred re-ranking; "
                         "16i: deferred, spread over the steps, a slice of layers each)")  # fmt: skip
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many steps of each largest-batch FlexiCache row")  # fmt: skip
    ap.add_argument("--lean", action="store_true", help="full KV from a graph only (no eager)")
    sa = ap.parse_args(rest)
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    hf = TINY if dry else LLAMA_3_1_8B
    context = 256 if dry else sa.context
    k_pages = 4 if dry else sa.top_k_pages
    bs = args.block_size
    also_r = [x.strip() for x in sa.also_r.split(",") if x.strip()]
    r_max = max([args.r, *(int(x.rstrip("di")) for x in also_r)])
    steps = timing.whole_periods(1 if dry else sa.steps, r_max, bs)
    warmup = 1 if dry else max(sa.warmup, 2 * r_max)  # two re-rankings
    lm = random_loaded_model(hf, dtype, str(device))
    ops = kernel_ops("auto", device)
    if dry:  # the CPU reference kernels' host reads are not counted (the GPU's read nothing)
        ops = replace(ops, paged_decode=uncounted(ops.paged_decode),
                      paged_decode_heads=uncounted(ops.paged_decode_heads))  # fmt: skip
    lm.model.kernels = ops
    mc = lm.config
    cfg = FlexiCacheConfig(
        top_k_pages=k_pages, recent_pages=args.recent, threshold=2.0, rerank_interval=args.r,
        rank_by=sa.rank,
    )  # fmt: skip  # threshold 2: stability only from the forced mask
    elem = torch.empty((), dtype=dtype).element_size()
    # tokens each sequence grows by: warmup, timed steps, 2 r counted, device probes
    probes = 0 if dry else sa.probes
    pages = -(-(context + warmup + steps + 2 * r_max + probes + sa.profile_steps + 1) // bs)
    page_bytes = 2 * bs * mc.head_dim * elem
    heads = mc.num_kv_layers * mc.num_kv_heads
    full_req = heads * pages * page_bytes
    s = sa.stable_fraction
    # resident pages per head, + summaries (2 D-vectors per page) and index tables
    flexi_req = heads * (
        (s * (k_pages + args.recent + cfg.sink_pages) + (1 - s) * pages) * page_bytes * 1.25
        + pages * (mc.head_dim * elem * {"bound": 2, "centroid": 1}.get(sa.rank, 0) + 8 + 4)
    )
    budget = 4 * full_req if dry else int(sa.kv_budget_gib * 2**30)
    b_full = max(1, min(sa.max_batch, budget // full_req))
    b_flexi = max(1, min(sa.max_batch, int(budget // flexi_req)))
    out = args.out or str(ROOT / "bench/results/flexicache_speed.json")
    head = {
        "environment": environment(),
        "mode": "speed",
        "model": "random Llama-3.1-8B-shaped" if not dry else "random tiny (dry run)",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shapes": {
            "context": context,
            "block_size": bs,
            "layers": mc.num_kv_layers,
            "kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "top_k_pages": k_pages,
            "recent_pages": args.recent,
            "rerank_interval": args.r,
            "stable_fraction_forced": s,
            "rank_by": sa.rank,
            "churn": sa.churn,
            "page_bytes": page_bytes,
            "kv_budget_bytes": budget,
            "steps": steps,
            "warmup": warmup,
            "probes": 0 if dry else sa.probes,
        },
        "timing": "wall: eager Python, one launch per op (host-bound where host_issue_ms_median"
        " ~ step_ms_median); device: device_ms_by_kind (see flexicache_timing.py)",
    }
    rows: list[dict] = []
    # one host buffer (K, V) for every FlexiCache row, sized for the largest batch
    numel = mc.num_kv_layers * max(b_full, b_flexi) * mc.num_kv_heads * pages * bs * mc.head_dim
    arena: list[torch.Tensor] = []

    filled: list[int] = []  # the batch whose pages the host buffer holds (decoded pages
    # differ, but every row writes those before it reads them)

    def host_views(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not arena:
            pin = device.type == "cuda"
            arena.extend(torch.empty(numel, dtype=dtype, pin_memory=pin) for _ in range(2))
        shape = (mc.num_kv_layers, batch, mc.num_kv_heads, pages, bs, mc.head_dim)
        n = math.prod(shape)
        return arena[0][:n].view(shape), arena[1][:n].view(shape)

    def measure(kind, batch, hysteresis=not sa.no_hysteresis, churn=sa.churn, name=None, r=None):
        mode = str(r)[-1] if r and str(r)[-1] in "di" else ""  # else the flags' mode
        spread = mode == "i" or (not mode and args.spread_rerank)
        deferred = spread or mode == "d" or args.deferred_rerank
        r = int(str(r).rstrip("di")) if r else args.r
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        tokens = torch.randint(0, mc.vocab_size, (batch,), device=device)
        probes = 0 if dry else sa.probes
        if kind == "full":
            attn = fullkv.FullKV(mc, batch, context, pages, bs, dtype, device, ops)
            extra = {"cuda_graph": name == "full_graph"}
            if extra["cuda_graph"]:
                step = fullkv.graph_step(lm.model, attn, tokens)
            else:
                step = fullkv.eager_step(lm.model, attn)
            t = timing.decode(step, attn.begin, tokens, steps, warmup, r, probes=probes)
            kv = attn.nbytes()
            del step
        else:
            store = _flexi_store(replace(cfg, rerank_interval=r), mc, batch, context, pages, bs,
                                 dtype, device, s, args.seed, churn, host_views(batch),
                                 filled=filled == [batch])  # fmt: skip
            filled[:] = [batch]  # the next row of this batch finds the same pages there
            store.hysteresis = hysteresis
            store.deferred_rerank = deferred
            store.rerank_spread = spread
            store.spare_pages = sa.spare_pages if hysteresis else 0
            store.time_fetch = True

            def snap():
                fetch_s = store.fetch_seconds() / steps
                return {"resident_pages": store.resident_pages(),
                        "fetch_in_place": store.zero_copy,
                        "fetched_pages_timed": store.fetched_pages,
                        "refetched_pages_timed": store.refetched_pages,
                        "reused_pages_timed": store.reused_pages,
                        "fetch_bytes_per_step": store.fetched_pages * page_bytes // steps,
                        "fetch_ms_per_step": round(fetch_s * 1e3, 2)}  # fmt: skip

            attn = _Flexi(store, ops, mc.sm_scale)
            kind_of = partial(_kind, attn, bs, r)
            gsteps = GraphSteps(lm.model, attn, tokens) if sa.graph and not dry else None

            def begin() -> str:
                store.begin_step()
                return kind_of()

            def hook(fn) -> None:  # the device probe's: called before each wait
                store.on_read = fn

            t = timing.decode(gsteps or _stepper(lm.model, attn), begin, tokens, steps, warmup, r,
                              store.reset_counters, snap, probes, hook)  # fmt: skip
            kv = store.gpu_bytes()
            prof = None
            if sa.profile_steps and batch == b_flexi:
                prof = timing.profile_steps(gsteps or _stepper(lm.model, attn), begin, tokens,
                                            sa.profile_steps)  # fmt: skip
            extra = {"hysteresis": hysteresis, "spare_pages": store.spare_pages, "r": r,
                     "deferred_rerank": store.deferred_rerank,
                     "rerank_spread": store.rerank_spread,
                     **(gsteps.counts() if gsteps else {"graph_captures": None}),
                     "churn": churn, **t["snap"], "profile": prof,
                     "fetch_share_of_step": round(t["snap"]["fetch_ms_per_step"] / 1e3
                                                  / t["mean"], 4),
                     "stable_head_fraction": round(store.stable_fraction(), 4),
                     "full_kv_bytes_same_batch": store.full_kv_bytes()}  # fmt: skip
            del store, snap, begin, kind_of, hook, gsteps
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
        sec = t["mean"]
        row = {"kv": kind, "row": name or kind, "batch": batch, "gpu_kv_bytes": kv,
               "gpu_kv_gib": round(kv / 2**30, 3),
               "peak_allocated_delta_gib": round(peak / 2**30, 3),
               "step_ms": round(sec * 1e3, 2), "step_ms_median": round(t["median"] * 1e3, 2),
               "step_ms_by_kind": t["by_kind_ms"], "timed_steps_by_kind": t["steps_by_kind"],
               "host_issue_ms_median": round(t["issue_median"] * 1e3, 2),
               "host_syncs_per_step_by_kind": t["syncs_by_kind"],
               "device_ms_by_kind": t["device_ms_by_kind"],
               "device_probe_valid": t["device_probe_valid"],
               "device_bound_step_ms": timing.device_bound_ms(t), **t["host"],
               "tokens_per_s": round(batch / sec, 1), **extra}  # fmt: skip
        del attn, t
        row["after_release"] = timing.release(device)  # before the next row allocates
        rows.append(row)
        print(row, flush=True)
        write_json(out, {**head, "partial": True, "rows": rows})  # a crash keeps the rows
        return row

    def graph_row() -> dict | None:  # the strongest full-KV baseline: a CUDA graph's replay
        try:
            return measure("full", b_full, name="full_graph")
        except RuntimeError as e:  # a capture that fails leaves the eager rows
            head["full_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            timing.release(device)
            return None

    lean = sa.lean and not dry
    graph = graph_row() if lean else None  # first: a timeout keeps the baseline
    full = None if lean else measure("full", b_full)
    flex_eq = measure("flexicache", b_full)
    flex_max = measure("flexicache", b_flexi)
    main_r = f"{args.r}{'i' if args.spread_rerank else 'd' if args.deferred_rerank else ''}"
    by_r = {main_r: flex_max, **{x: measure("flexicache", b_flexi, r=x) for x in also_r}}
    no_hyst = measure("flexicache", b_flexi, False) if sa.compare_hysteresis else None
    other = None
    if sa.compare_churn is not None:
        other = measure("flexicache", b_flexi, churn=sa.compare_churn, name="compare_churn")
    if not dry and not lean:
        graph = graph_row()
    if lean and graph is not None:
        full = full2 = graph
    else:
        full = full or graph or measure("full", b_full)
        full2 = measure("full", b_full, name="full_repeat")  # host-speed drift over the run
    summary = summarize(full, full2, flex_eq, flex_max, no_hyst, other, budget, graph)
    summary["by_rerank_interval"] = {x: by_interval(row, summary) for x, row in by_r.items()}
    return {**head, "rows": rows, "summary": summary}
