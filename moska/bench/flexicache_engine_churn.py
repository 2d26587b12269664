"""A random model's re-ranking churn for the engine bench (`flexicache_engine_speed.py`,
`FlexiEngine.score_hook`): the speed bench's `--churn` rate on the engine's rankings."""

from __future__ import annotations

import torch


class ChurnScores:
    """The speed bench's churn (`flexicache_speed._ChurnScores`) for the engine: per (layer,
    KV head) (1 - churn) K fixed `hot` pages get a large bonus, the rest of the top-K is
    drawn at random at each re-ranking, so a stable head replaces about churn * K pages per
    re-ranking (0.375: the rate of moska-code-20m at K = 32, threshold 0.75) instead of
    nearly all of them (random keys' rankings). Hot pages lie in the first `pages`; scores
    of up to `cap` pages are taken. `only` [L, Hkv] bool: the heads that get the bonus (the
    forced-stable ones; the others rank at random, as the model's own scores plus noise)."""

    def __init__(self, flexi, pages: int, cap: int, churn: float, seed: int, only=None) -> None:
        cfg = flexi.cfg
        gen = torch.Generator().manual_seed(seed + 1)
        n_hot = round((1 - churn) * cfg.top_k_pages)
        span = max(pages - cfg.sink_pages - cfg.recent_pages - 1, n_hot)
        shape = (flexi.num_layers, flexi.num_kv_heads)
        hot = torch.rand(*shape, span, generator=gen).argsort(-1)[..., :n_hot] + cfg.sink_pages
        self.bonus = torch.zeros(*shape, max(cap, pages) + 64)
        self.bonus.scatter_(-1, hot, 1e3)
        if only is not None:  # [L, Hkv] bool: the other heads keep the model's own ranking
            self.bonus *= only[..., None].to(self.bonus.dtype)
        self.bonus = self.bonus.to(flexi.device)

    def __call__(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        bonus = self.bonus[layer, :, : scores.shape[-1]]
        return scores + bonus + 10 * torch.rand(scores.shape, device=scores.device)

    def layers(self, lo: int, scores: torch.Tensor) -> torch.Tensor:
        """Layers lo.. at once (`scores` [n, B, Hkv, P]): a re-ranking of every layer
        (`batched_scores.scores_all`) adds ~3 ops, not ~7 per layer (240 at 32 layers)."""
        bonus = self.bonus[lo : lo + scores.shape[0], None, :, : scores.shape[-1]]
        return scores + bonus + 10 * torch.rand(scores.shape, device=scores.device)
