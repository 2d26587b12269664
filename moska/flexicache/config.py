"""FlexiCache's knobs, one frozen config (EngineConfig.flexicache, `--flexicache`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlexiCacheConfig:
    """top_k_pages: pages a stable head keeps besides the recent ones. recent_pages: the
    newest pages every head keeps (>= 1: the page being written is always read).
    sink_pages: the first pages every head keeps (attention sinks, as StreamingLLM's).
    rank_by: "centroid" (attention mass estimated from each page's mean key, one D-vector
    per page and head kept on the device: no host reads), "mass" (the exact softmax mass
    over every key of the head, read at re-rankings: from the host copy for offloaded
    pages) or "bound" (Quest's upper bound of q.k from per-page key min/max on the device;
    on moska-code-20m it ranks badly: +25-35% loss at K=16, see README).
    threshold: a head whose top-K overlaps its previous top-K by at least this fraction is
    stable (> 1: every head unstable, i.e. full KV). rerank_interval: steps between
    re-rankings (R). min_pages: requests with fewer pages than this keep everything.
    rerank: "deferred" (a re-ranking ranks with the queries of the step just run and its
    pages are read from the next step on, as `deferred.py`; the measured configuration,
    1.19x full KV's tokens/s on the H200 at r = 16) or "step" (the pages a re-ranking picks
    are read in the same step). hold_unranked (deferred only): a page leaving the recent
    window stays kept until the next re-ranking ranks it (+0.52 % loss against +0.91 %
    without, r = 16, moska-code-20m). Both configure the engine (`engine_hook.py`); the
    bench's page store (`store.FlexiKV`) takes them as attributes. host_gib: the host
    buffer (pinned on CUDA) that every hand-off's host copy is carved from, allocated once
    when the engine starts (`host_pool.py`): -1 ("auto"): twice the GPU KV cache's bytes,
    at most half the host's memory; 0: none (each hand-off allocates its own, as before:
    one step of 38 hand-offs took 4.6 s on the H200). shared_slots (`slots=shared`): a
    request's page pool is one slot space for all layers (a slot of any layer's part of a
    pool block holds a page of any layer; the kernel reads the cache as one
    [L * N, bs, Hkv, D] tensor), so the pool is sized by the mean layer's need instead of
    the worst layer's; dropped pages leave their slot at once (no hysteresis). `on` is
    K = 32, threshold 0.75, r = 16 deferred, held pages, slots=shared: on moska-code-20m
    through the engine, 16 held-out windows, +0.25 % loss at 57.4 % of full KV's GPU blocks
    and a needle 300-1,040 tokens back kept (threshold 0.6: +1.91 % at 42.6 %, the needle
    lost in 4 of 16 windows; on 4 of the windows +0.34 % at 45.6 %); per-layer pools
    (`slots=layer`) at 0.75: +0.57 % at 90.3 % (each layer's pool is sized by its worst
    layer). In one H200 KV budget (7.87 GiB) `slots=shared` with 0.66 of the heads stable
    (threshold 0.75's share on the quality model) fits 31 requests against full KV's 15 at
    1.105x full KV's tokens/s (with 0.75-0.78 stable: 36 at 1.14-1.18x; per-layer pools:
    0.95-0.98x)."""

    top_k_pages: int = 32
    recent_pages: int = 2
    sink_pages: int = 1
    rank_by: str = "centroid"
    threshold: float = 0.75  # with slots=shared: +0.25 % loss at 57.4 % of the GPU KV (16 windows)
    rerank_interval: int = 16
    min_pages: int = 0
    rerank: str = "deferred"
    hold_unranked: bool = True
    host_gib: float = -1.0
    shared_slots: bool = True  # `on`: the only form that met both #21 targets (README)

    def __post_init__(self) -> None:
        if self.top_k_pages < 1:
            raise ValueError(f"flexicache top_k_pages must be >= 1, got {self.top_k_pages}")
        if self.recent_pages < 1:
            raise ValueError(
                f"flexicache recent_pages must be >= 1 (the page being written), got "
                f"{self.recent_pages}"
            )
        if self.rank_by not in ("centroid", "mass", "bound"):
            raise ValueError(
                f"flexicache rank_by must be 'centroid', 'mass' or 'bound', got {self.rank_by!r}"
            )
        if self.sink_pages < 0:
            raise ValueError(f"flexicache sink_pages must be >= 0, got {self.sink_pages}")
        if self.rerank_interval < 1:
            raise ValueError(f"flexicache rerank_interval must be >= 1, got {self.rerank_interval}")
        if self.rerank not in ("deferred", "step"):
            raise ValueError(f"flexicache rerank must be 'deferred' or 'step', got {self.rerank!r}")
        if self.host_gib < 0 and self.host_gib != -1:
            raise ValueError(f"flexicache host must be 'auto' or GiB >= 0, got {self.host_gib}")
        if not 0.0 <= self.threshold:
            raise ValueError(f"flexicache threshold must be >= 0, got {self.threshold}")

    def long_enough(self, n_pages: int) -> bool:
        """Whether a request of `n_pages` pages is offloaded at all: it must have more
        candidate pages than a stable head keeps."""
        kept = self.top_k_pages + self.recent_pages + self.sink_pages
        return n_pages >= self.min_pages and n_pages > kept

    @classmethod
    def parse(cls, spec: str) -> FlexiCacheConfig:
        """`--flexicache` value: "on" (defaults) or "k=32,recent=2,threshold=0.75,r=16"
        (also sink=, rank=centroid|mass|bound, min_pages=, rerank=deferred|step,
        hold=on|off, host=auto|GiB, slots=layer|shared)."""
        if spec.strip().lower() in ("", "on", "1", "true"):
            return cls()
        names = {
            "k": "top_k_pages",
            "recent": "recent_pages",
            "sink": "sink_pages",
            "rank": "rank_by",
            "threshold": "threshold",
            "r": "rerank_interval",
            "min_pages": "min_pages",
            "rerank": "rerank",
            "hold": "hold_unranked",
            "host": "host_gib",
            "slots": "shared_slots",
        }
        kw: dict[str, float | int | str | bool] = {}
        for part in spec.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(
                    f"bad --flexicache item {part!r}; use 'on' or k=,recent=,threshold=,r=,"
                    "min_pages=,rerank=deferred|step,hold=on|off,host=auto|GiB,slots=layer|shared "
                    "(comma-separated)"
                )
            val = val.strip()
            if key == "hold":
                if val.lower() not in ("on", "off", "1", "0", "true", "false"):
                    raise ValueError(f"bad --flexicache item {part!r}; use hold=on or hold=off")
                kw[names[key]] = val.lower() in ("on", "1", "true")
            elif key in ("rank", "rerank"):
                kw[names[key]] = val
            elif key == "slots":
                if val not in ("layer", "shared"):
                    raise ValueError(f"bad --flexicache item {part!r}; use slots=layer|shared")
                kw[names[key]] = val == "shared"
            elif key == "host":
                try:
                    kw[names[key]] = -1.0 if val.lower() == "auto" else float(val)
                except ValueError:
                    raise ValueError(f"bad --flexicache item {part!r}; use host=auto or GiB")
                if kw[names[key]] != -1.0 and float(kw[names[key]]) < 0:
                    raise ValueError(f"bad --flexicache item {part!r}; host GiB must be >= 0")
            else:
                kw[names[key]] = float(val) if key == "threshold" else int(val)
        return cls(**kw)  # type: ignore[arg-type]
