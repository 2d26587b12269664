"""Pieces of the serving benchmark (`moska.bench.serve`): random-KV libraries made without a
prefill, the request workload (arrivals all at once or by a Poisson process), the loop that
drives a real `LLMEngine` through it while timing every request, and the latency figures.

A random library has the shape, dtype and routing index of a real one, so every kernel,
the router and the engine's bookkeeping cost what they would; only its values are noise
(at Llama-3.1-8B dims a real prefill of a 127K-token library costs most of a minute).
"""

from __future__ import annotations

import datetime
import inspect
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams
from moska.library.loaded import LoadedLibrary
from moska.library.manager import LibraryManager


def random_token_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def random_library(
    loaded, token_ids: list[int], chunk_size: int, name: str, kv_dtype: str = "auto", seed: int = 0
) -> LoadedLibrary:
    """A prefix-mode library over `token_ids` whose KV pools are random normal values (no
    prefill), with its routing index built from them and, for kv_dtype "fp8", its pools
    quantized to e4m3 with per-(chunk, KV head) scales, both as the real builder does."""
    from moska.kernels.router import build_routing_index
    from moska.library.chunking import corpus_from_token_ids

    corpus = corpus_from_token_ids([("random", token_ids)], "prefix", chunk_size)
    config = loaded.config
    param = next(loaded.model.parameters())
    shape = (corpus.num_tokens, config.num_kv_heads, config.head_dim)  # [S_total, Hkv, D]
    gen = torch.Generator(device=param.device).manual_seed(seed)

    def pool() -> torch.Tensor:
        return torch.empty(shape, dtype=param.dtype, device=param.device).normal_(generator=gen)

    k_pools = [pool() for _ in range(config.num_kv_layers)]
    v_pools = [pool() for _ in range(config.num_kv_layers)]
    offsets = torch.tensor(corpus.chunk_offsets, dtype=torch.int32, device=param.device)
    extra: dict = {}
    with torch.inference_mode():
        routing = [build_routing_index(k, offsets) for k in k_pools]  # from the exact keys
        if kv_dtype == "fp8":
            from moska.library.fp8 import quantize

            scales = []
            for i in range(len(k_pools)):
                kq, vq = quantize(k_pools[i], offsets), quantize(v_pools[i], offsets)
                k_pools[i], v_pools[i] = kq.data, vq.data
                scales.append((kq.scale, vq.scale))
            extra = {"kv_scale_pools": scales}
    manifest = synthetic_manifest(name, loaded, corpus, routing, kv_dtype)
    ids = torch.tensor(corpus.token_ids, dtype=torch.int32)  # [S_total]
    return LoadedLibrary(manifest, offsets, k_pools, v_pools, routing, ids, **extra)


def synthetic_manifest(name: str, loaded, corpus, routing, kv_dtype: str = "auto"):
    """The manifest of a library whose KV was made, not prefilled (benchmarks): no files,
    a build of zero seconds, a fresh build id."""
    from moska.library.format import Manifest, model_fingerprint
    from moska.library.info import BuildStats

    return Manifest(
        name=name,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=model_fingerprint(loaded),
        mode=corpus.mode,
        chunk_size=corpus.chunk_size,
        num_tokens=corpus.num_tokens,
        position_offset=corpus.position_offset,
        begins_with_bos=False,
        chunks=corpus.chunks,
        documents=corpus.documents,
        routing_rank=int(routing[0].basis.shape[-1]),
        files={},
        build=BuildStats(corpus.num_tokens, 0.0, 0.0).to_dict(),
        build_id=uuid.uuid4().hex,
        kv_dtype=kv_dtype,
    )


def fp8_build_supported() -> bool:
    """Whether the library builder takes `kv_dtype` (FP8 library KV, issue 16)."""
    from moska.library.builder import build_in_memory

    return "kv_dtype" in inspect.signature(build_in_memory).parameters


class InMemoryLibraries(LibraryManager):
    """A LibraryManager that also serves libraries made in memory (never saved): `add`
    keeps one loaded under its name, as `build(..., keep_loaded=True)` does."""

    def add(self, library: LoadedLibrary) -> None:
        with self._lock:
            self._register(library.name, library)


@dataclass(frozen=True)
class Workload:
    """N requests with their own prompts of `unique_tokens` and `max_tokens` generated
    each, arriving at `arrivals` seconds after the start (all zero: all at once)."""

    prompts: tuple[tuple[int, ...], ...]
    arrivals: tuple[float, ...]
    max_tokens: int
    pattern: str  # "burst" or "poisson@<rate>"

    @staticmethod
    def make(
        n: int, unique_tokens: int, max_tokens: int, vocab: int, rate: float | None, seed: int
    ) -> Workload:
        """rate None: all arrive at once; else Poisson arrivals at `rate` requests/s."""
        prompts = tuple(tuple(random_token_ids(unique_tokens, vocab, seed + i)) for i in range(n))
        if rate is None:
            arrivals = (0.0,) * n
        else:
            gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
            arrivals = tuple(float(t) for t in np.cumsum(gaps) - gaps[0])
        pattern = "burst" if rate is None else f"poisson@{rate:g}"
        return Workload(prompts, arrivals, max_tokens, pattern)


@dataclass
class RequestTiming:
    arrival: float
    first: float | None = None  # seconds from the start to its first output token
    finish: float | None = None
    tokens: int = 0


def drive(
    engine: LLMEngine,
    work: Workload,
    tag: str,
    *,
    prefix: list[int] | None = None,
    library: str | None = None,
    step=None,
) -> tuple[list[RequestTiming], float, float]:
    """Run `work` through `engine`: each request is added once its arrival time has passed
    (checked between steps, as a server's engine loop would) and every output timed when
    `step()` hands it to the host. `prefix`: token ids put before every prompt (the
    prefix-cached baseline); `library`: the library every request names; `step`: what runs
    one step (default engine.step; serve_steps.StepRecorder.step times it). Returns the
    timings, the wall seconds from the start to the last token and the seconds spent in
    add_request."""
    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=True)
    timings = [RequestTiming(a) for a in work.arrivals]
    order = deque(sorted(range(len(timings)), key=lambda i: work.arrivals[i]))
    index: dict[str, int] = {}
    head = list(prefix or [])
    step = step or engine.step
    adding = 0.0  # host seconds in add_request (a long prefix's token checks and hashing)
    t0 = time.perf_counter()
    while order or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while order and work.arrivals[order[0]] <= now:
            i = order.popleft()
            rid = f"{tag}-{i}"
            index[rid] = i
            ta = time.perf_counter()
            engine.add_request(rid, head + list(work.prompts[i]), params, library=library)
            adding += time.perf_counter() - ta
        if not engine.has_unfinished_requests():  # idle until the next arrival
            time.sleep(max(0.0, work.arrivals[order[0]] - now))
            continue
        for out in step():
            t = time.perf_counter() - t0
            tm = timings[index[out.request_id]]
            if out.new_token_ids:
                tm.tokens += len(out.new_token_ids)
                if tm.first is None:
                    tm.first = t
            if out.finished:
                tm.finish = t
    wall = max((t.finish or 0.0) for t in timings) if timings else 0.0
    return timings, wall, adding


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def latency_figures(timings: list[RequestTiming], wall: float) -> dict:
    """Output tokens/s over the run (first arrival to last token), TTFT (arrival to first
    token) and TPOT (mean gap between a request's later tokens), p50 and p99."""
    ttft = [t.first - t.arrival for t in timings if t.first is not None]
    tpot = [
        (t.finish - t.first) / (t.tokens - 1)
        for t in timings
        if t.first is not None and t.finish is not None and t.tokens > 1
    ]
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "finished": sum(t.finish is not None for t in timings),
        "output_tokens": tokens,
        "seconds": wall,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
    }


def tier_snapshot(library) -> dict | None:
    """A tiered library's counters now (per tier hits, misses, bytes in; see
    moska.library.tiers.TierStats), None for a library wholly on the device."""
    tiers = getattr(library, "tiers", None)
    return None if tiers is None else tiers.stats.as_dict()


def tier_delta(before: dict | None, after: dict | None) -> dict | None:
    """What a run moved between two snapshots, with hits / (hits + misses) per tier."""
    if before is None or after is None:
        return None
    out: dict = {}
    for tier in after["hits"]:
        hits = after["hits"][tier] - before["hits"].get(tier, 0)
        misses = after["misses"][tier] - before["misses"].get(tier, 0)
        out[tier] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "bytes_in": after["bytes_in"][tier] - before["bytes_in"].get(tier, 0),
        }
    for key in ("skipped", "prefetched"):
        out[key] = after[key] - before[key]
    return out
