"""SemShareKV settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SemShareConfig:
    """How semantic KV reuse matches and blends.

    threshold: a token reuses its nearest reference token's KV when their feature cosine
        (mean of token and context similarity, `matching.py`) is at least this.
    recompute_fraction: share of the matched tokens recomputed anyway, those whose KV
        deviates most from the reference's at the last fully computed layer (CacheBlend).
        0.0 by default (0.05 until session 17), by measurement: at 0.0 every reworded
        5,120-token request ran >= 3.11x a plain prefill on the H200 (2.81-2.90x for one
        document at 0.05) with the loss on moska-code-20m within 2% (+0.58 / -0.01 / +0.52%,
        `semshare_speed_8b_h200_session16b.json`, `semshare_quality_session16_fractions.json`).
    recompute_layers: first layers computed for every token of the prompt (their KV is
        fresh; the deviation is measured on the last of them). 1 sees only token identity
        (layer 0's KV depends on the token alone); 2 sees one layer of context.
    window: context tokens in a token's matching feature.
    min_candidate_score: share of a prompt's tokens that must collide (LSH) with a stored
        reference for it to be considered at all.
    min_reuse_fraction: below this share of matched prompt tokens the prompt is computed in
        full (and stored as a new reference).
    min_prompt_tokens: shorter prompts are neither matched nor stored.
    row_granule: on CUDA the rows recomputed past the boundary are padded (with the next
        most deviating matched rows) to a bucket of this granule (`blend.row_bucket`), so
        matmul shapes repeat across requests; 1 turns it off (always off on the CPU).
    store_bytes: the reference store's bound (KV + features).
    cuda_graphs: on CUDA with row buckets, the layers past the boundary run as one CUDA graph
        per bucket (`graphs.py`), captured at engine start; False: eagerly (a launch each).
    share_blocks: in an engine (references kept as blocks of the paged cache), a planned
        request takes the reference's blocks whose KV it would copy unchanged (every token
        equal to the reference's at the same position, with `recompute_layers` 1) instead
        of fresh blocks (`sharing.py`): less KV held, the same output; False: copies.
    finish_in_blend: in a step of planned prompts' last ranges only, the blend computes each
        prompt's last token too (through every layer, as a row past the boundary) and the
        engine samples from its hidden state without a forward (`reuse.SemanticReuse.prefill`);
        False: the step's forward computes the last tokens (a pass over the weights).
    """

    threshold: float = 0.9
    recompute_fraction: float = 0.0
    recompute_layers: int = 1
    window: int = 4
    min_candidate_score: float = 0.3
    min_reuse_fraction: float = 0.3
    min_prompt_tokens: int = 16
    store_bytes: int = 1 << 30
    lsh_bands: int = 8
    lsh_rows: int = 16
    seed: int = 0
    row_granule: int = 64
    cuda_graphs: bool = True
    finish_in_blend: bool = True
    share_blocks: bool = True

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"semantic reuse threshold is a cosine in [-1, 1], got {self.threshold}"
            )
        if not 0.0 <= self.recompute_fraction <= 1.0:
            raise ValueError(
                f"semantic recompute fraction must be in [0, 1], got {self.recompute_fraction}"
            )
        if self.recompute_layers < 1:
            raise ValueError(
                "semantic recompute layers must be >= 1 (the deviation is measured there)"
            )
        if self.window < 1 or self.min_prompt_tokens < 2:
            raise ValueError("window must be >= 1 and min_prompt_tokens >= 2")
        if not 0.0 <= self.min_candidate_score <= 1.0 or not 0.0 <= self.min_reuse_fraction <= 1.0:
            raise ValueError("min_candidate_score and min_reuse_fraction are shares in [0, 1]")
        if self.row_granule < 1:
            raise ValueError(f"semantic row granule must be >= 1, got {self.row_granule}")
        if self.store_bytes < 1:
            raise ValueError("the semantic reuse store needs a positive size")
