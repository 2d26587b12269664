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
    re-rankings (R). min_pages: requests with fewer pages than this keep everything."""

    top_k_pages: int = 32
    recent_pages: int = 2
    sink_pages: int = 1
    rank_by: str = "centroid"
    threshold: float = 0.75  # K=32: +0.54% loss at 46% of the KV on moska-code-20m
    rerank_interval: int = 8
    min_pages: int = 0

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
        if not 0.0 <= self.threshold:
            raise ValueError(f"flexicache threshold must be >= 0, got {self.threshold}")

    def long_enough(self, n_pages: int) -> bool:
        """Whether a request of `n_pages` pages is offloaded at all: it must have more
        candidate pages than a stable head keeps."""
        kept = self.top_k_pages + self.recent_pages + self.sink_pages
        return n_pages >= self.min_pages and n_pages > kept

    @classmethod
    def parse(cls, spec: str) -> FlexiCacheConfig:
        """`--flexicache` value: "on" (defaults) or "k=32,recent=2,threshold=0.75,r=8"
        (also sink=, rank=centroid|mass|bound, min_pages=)."""
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
        }
        kw: dict[str, float | int | str] = {}
        for part in spec.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(
                    f"bad --flexicache item {part!r}; use 'on' or k=,recent=,threshold=,r=,"
                    "min_pages= (comma-separated)"
                )
            kw[names[key]] = (
                float(val) if key == "threshold" else val.strip() if key == "rank" else int(val)
            )
        return cls(**kw)  # type: ignore[arg-type]
