"""Tile configuration of the grouped shared-chunk kernel, chosen per model shape.

The best tile depends on the head dim D (registers per row), the GQA ratio G (query rows
each selection brings) and how many query rows a (chunk, KV head) group holds on average
(`rows_per_group`: the reuse of one K/V block read). One fixed tile left other shapes at
0.44-0.50 of their floor at B = 1,024 (issue 22), so the launcher looks the tile up here.

`TABLE` holds the tiles measured at Llama-3.1-8B dims (Hq 32 / Hkv 8 / D 128, bf16, H200;
bench/results/kernels.json) for every (D, G) family. The per-shape sweep
(`python -m moska.bench.kernels_shapes`, bench/results/kernels_shapes_d128.json and
_d64.json) found them within 2.4% (D 128) and 2.0% (D 64) of the best candidate at every
(G, B) point, so they stay; a new GPU re-runs the sweep and pastes its `table` entries (the
fields below) here. A G between table entries takes
the next larger G's entries (its rows per request are closest); a D or G outside the table
takes `fallback`. Pure Python: the launcher imports this, and nothing from the rest of moska.
"""

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class GroupedTuning:
    """One launch configuration of `grouped_shared_attention`.

    block_m query rows x block_n keys per tile step; num_warps / num_stages as Triton takes
    them; use_tma: TMA block loads on Hopper (pointer loads when the pool does not allow
    them); min_split: split-KV parts of at least this many keys; merge_m rows x split_b
    partials per step of the split merge; programs_per_sm: the work list aims at this many
    items per SM (split-KV adds items until it does); half_tail: a group's last tile of at
    most block_m / 2 rows computes only block_m / 2 (less padding at large B, 128-row tiles);
    pipe_qk: QK^T issued one key block ahead of the softmax (FA3's overlap in the source)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = True
    warp_specialize: bool = False
    min_split: int = 512
    merge_m: int = 4
    split_b: int = 32
    programs_per_sm: int = 2
    half_tail: bool = False
    pipe_qk: bool = False

    def launch_config(self, sms: int) -> dict:
        """The launcher's keyword dict (target_programs from the GPU's SM count)."""
        cfg = asdict(self)
        cfg["target_programs"] = self.programs_per_sm * sms
        del cfg["programs_per_sm"]
        return cfg


@dataclass(frozen=True)
class TuneEntry:
    """`tuning` serves head dim `head_dim`, GQA ratio `gqa` and groups of >= `min_rows`
    rows on average (the entry with the largest such min_rows wins)."""

    head_dim: int
    gqa: int
    min_rows: float
    tuning: GroupedTuning


# The tiles measured at Llama-3.1-8B dims (H200, bf16; docs/performance-notes.md): groups of
# >= 256 rows (a chunk read by >= 64 requests at G = 4) ran 7-17% faster with TMA 128 x 128
# tiles, 8 warps, 3 stages than with 64 x 64 pointer loads; smaller groups (routed decode,
# ~16-128 rows per chunk): 64 x 64 tiles, 4 warps, 3 stages, ~2 items per SM, TMA loads 5-10%
# faster at 128 rows per group. D = 64 used 64 x 128 tiles. The split merge: 4 rows x 32
# partials per step took 7 us where 8 x 8 took 27 us (one 128K chunk read by 16 requests).
_SMALL_D128 = GroupedTuning(block_m=64, block_n=64, num_warps=4, num_stages=3)
_LARGE_D128 = GroupedTuning(block_m=128, block_n=128, num_warps=8, num_stages=3)
_SMALL_D64 = GroupedTuning(block_m=64, block_n=128, num_warps=4, num_stages=3)
# G = 8 at D = 128 from 128 rows per group (session 15's variant sweep, H200,
# bench/results/kernels_shapes_variants_h200_session15.json): one chunk read by B = 16
# (128 rows) ran in 0.167 ms with the large tile where the small one took 0.187 (11 %
# faster). Warp specialization with half tails was mixed at B = 1,024 (uniform 6 % faster,
# Zipf 2.4 % slower), so it stays off; other shapes' best candidates were within 0-3 %.

GQA_RATIOS = (1, 2, 4, 8)
HEAD_DIMS = (64, 128)

TABLE: tuple[TuneEntry, ...] = (
    *(TuneEntry(128, g, 0, _SMALL_D128) for g in GQA_RATIOS),
    *(TuneEntry(128, g, 256, _LARGE_D128) for g in GQA_RATIOS),
    TuneEntry(128, 8, 128, _LARGE_D128),
    *(TuneEntry(64, g, 0, _SMALL_D64) for g in GQA_RATIOS),
)

# The Triton interpreter (CPU, tests and dry runs): few, large programs.
INTERPRETER = GroupedTuning(
    block_m=64,
    block_n=64,
    num_warps=4,
    num_stages=1,
    use_tma=False,
    min_split=64,
    merge_m=64,
    split_b=4,
    programs_per_sm=8,  # with sms=1: 8 items
)


def fallback(head_dim: int) -> GroupedTuning:
    """A shape the table lacks: the small-group rule the table started from (64-key blocks
    from D = 128 up keep a K/V tile's registers in bounds)."""
    return GroupedTuning(
        block_m=64, block_n=64 if head_dim >= 128 else 128, num_warps=4, num_stages=3
    )


def entries_for(head_dim: int, gqa: int, table: tuple[TuneEntry, ...] = TABLE) -> list[TuneEntry]:
    """The table's entries that serve (head_dim, gqa), by min_rows: the exact G's, else the
    next larger G's in the table, else the largest G's; empty when the D is not there."""
    gs = sorted({e.gqa for e in table if e.head_dim == head_dim})
    if not gs:
        return []
    g = next((x for x in gs if x >= gqa), gs[-1])
    return sorted(
        (e for e in table if e.head_dim == head_dim and e.gqa == g), key=lambda e: e.min_rows
    )


def grouped_tuning(
    head_dim: int, gqa: int, rows_per_group: float, table: tuple[TuneEntry, ...] = TABLE
) -> GroupedTuning:
    """The tile for this shape: the entry of (head_dim, gqa) with the largest min_rows not
    above rows_per_group (average query rows of a (chunk, KV head) group)."""
    best = None
    for e in entries_for(head_dim, gqa, table):
        if e.min_rows <= rows_per_group:
            best = e.tuning
    return best if best is not None else fallback(head_dim)


# One chunk read by every KV head of B requests (`shared_one_chunk.py`): which backend runs
# it, per head dim and GQA ratio, from `min_rows` query rows per KV head (B * G) up, as the
# H200 measured it (bench/results/kernels_one_chunk_h200_session16.json, a 128K-token chunk,
# bf16, every call replayed from a CUDA graph, cuDNN asked for its LSE like our kernel):
# cuDNN has a floor of ~1.1 ms (D 64) / ~1.5 ms (D 128) at any B (no split of the keys: few
# programs at few rows), so up to 1,024 rows ours wins 1.0-1.8x; from 2,048 rows it wins at
# D 128 G 2 / G 8 (1.64 vs 1.84 / 1.98 ms) and D 64 G 2 (1.18 vs 1.21), at 8,192 rows at
# G 8 (7.13 vs 7.96; D 64 4.67 vs 4.95); ours stays ahead at G 4 up to 4,096 rows (3.56 vs
# 3.68 ms D 128, 2.42 vs 2.46 D 64) and at D 64 G 8 B 256 (1.16 vs 1.22). Flash never won:
# at most a tie at B = 16. Session 17 (kernels_one_chunk_h200_session17.json, 4 rotated
# rounds, ratios paired round by round: the same call drifted up to 20 % between rounds in
# session 16b) moved D 128 G 4 from 4,096 rows to cuDNN (3.35 vs 3.70 ms, paired 0.91 of
# cuDNN's speed; session 16b had a tie); D 64 G 2 / G 8 at 2,048 / 8,192 rows tied there
# (paired 0.96-1.02), so they keep cuDNN. `python -m moska.bench.kernels_one_chunk` writes these entries
# (`one_chunk_table`): each measured (D, G, B) takes the faster side, and rows between two
# measured points take the lower one's choice. A G between entries takes the next larger
# G's (as the grouped table does); a D not here runs "triton". That table compares Triton
# with the SDPA backends; the "gluon" entry comes from `python -m moska.bench.kernels_gluon`.
ONE_CHUNK_BACKENDS = ("triton", "cudnn", "flash", "gluon")
# "gluon": moska/kernels/gluon_one_chunk.py (Hopper only: elsewhere cuDNN, or "triton" where
# SDPA cannot run), FA3's ping-pong of two 64-row consumer warpgroups with its intra-warpgroup
# overlap ("wso"), with these keywords (session 18, H200, bench/results/kernels_gluon_h200_
# session18*.json: 3 stages 27 % faster than 2; wso the steadiest of the schedules).
GLUON_ONE_CHUNK: dict[str, Any] = {"schedule": "wso", "block_m": 64, "block_n": 128, "stages": 3}


@dataclass(frozen=True)
class OneChunkEntry:
    """`backend` serves head dim `head_dim` and GQA ratio `gqa` from `min_rows` rows per KV
    head up (the entry of that (D, G) with the largest such min_rows wins)."""

    head_dim: int
    gqa: int
    min_rows: int
    backend: str


ONE_CHUNK: tuple[OneChunkEntry, ...] = (
    *(OneChunkEntry(d, g, 0, "triton") for d in HEAD_DIMS for g in GQA_RATIOS),
    OneChunkEntry(128, 2, 2048, "cudnn"),
    OneChunkEntry(128, 4, 4096, "gluon"),  # session 18 (below), cuDNN in session 17
    OneChunkEntry(128, 8, 2048, "cudnn"),
    # session 18: Gluon wso against cuDNN, paired round by round over 16 rounds of four
    # H200 runs (kernels_gluon_h200_session18c / c2 / d / e.json): at 8,192 rows (D 128 G 8
    # B 1,024) median 1.024x, 12 rounds above 1.0 (0.92-1.07); at 4,096 rows (G 4 B 1,024)
    # median 1.022x, 12 of 16 at or above 1.0 (0.95-1.10); at 2,048 rows (G 8 B 256, G 2
    # B 1,024) 0.90-1.01 and 0.91-1.07 (median 0.96): cuDNN stays there
    OneChunkEntry(128, 8, 8192, "gluon"),
    OneChunkEntry(64, 2, 2048, "cudnn"),
    OneChunkEntry(64, 8, 8192, "cudnn"),
)


def one_chunk_backend(
    head_dim: int,
    gqa: int,
    rows: int,
    dtype: object = None,
    device_type: str = "cuda",
    table: tuple[OneChunkEntry, ...] = ONE_CHUNK,
) -> str:
    """The backend of one chunk read by `rows` query rows per KV head at GQA ratio `gqa`:
    the entry of (head_dim, the table's G nearest at or above gqa, else its largest) with the
    largest min_rows <= rows; "triton" where the D is not in the table. SDPA's fused kernels
    take fp16/bf16 on CUDA only: anything else runs "triton"."""
    if device_type != "cuda" or str(dtype) not in ("torch.float16", "torch.bfloat16"):
        return "triton"
    if table is ONE_CHUNK:  # every layer of every eager step asks: ~5-15 us of Python each
        return _one_chunk_lookup(head_dim, gqa, rows)
    return _lookup(head_dim, gqa, rows, table)


@lru_cache(maxsize=4096)
def _one_chunk_lookup(head_dim: int, gqa: int, rows: int) -> str:
    return _lookup(head_dim, gqa, rows, ONE_CHUNK)


def _lookup(head_dim: int, gqa: int, rows: int, table: tuple[OneChunkEntry, ...]) -> str:
    gs = sorted({e.gqa for e in table if e.head_dim == head_dim})
    if not gs:
        return "triton"
    g = next((x for x in gs if x >= gqa), gs[-1])
    best, best_rows = "triton", -1
    for e in table:
        if e.head_dim == head_dim and e.gqa == g and best_rows < e.min_rows <= rows:
            best, best_rows = e.backend, e.min_rows
    return best
