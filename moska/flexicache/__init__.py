"""FlexiCache: head-aware offload of long unique contexts (issue 21, part 3).

Per KV head, the overlap of its top-K pages between re-rankings classifies it stable or
unstable; stable heads attend to (and keep on the GPU) only their top-K pages plus the most
recent ones, unstable heads keep every page. `config` (the knobs), `policy` (ranking,
classification, per-head page lists), `store` (the compact GPU page pool over a full host
copy: real bytes, for the benchmarks), `engine_hook` (the engine's decode steps: per-head
lists over the paged cache; once a request is classified its older pages go to pinned host
memory and its freed blocks to the allocator: real bytes). `--flexicache on` is K = 32,
threshold 0.75, r = 16 deferred, held pages, `slots=shared` (`config.FlexiCacheConfig`).
"""

from moska.flexicache.config import FlexiCacheConfig

__all__ = ["FlexiCacheConfig"]
