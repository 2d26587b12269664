"""The tiles `moska.bench.kernels_shapes_variants` tries at each point: per head dim the
grouped kernel's candidates (GROUPED; HIGH_G for `--high-g`), the one-chunk case's (SINGLE)
and the CPU dry run's (DRY_TILES), and `variants`, which puts the tuning table's own tile
first. Plain data over `GroupedTuning`: nothing here launches a kernel."""

from moska.bench.kernels_shapes import tag
from moska.kernels.shared_tuning import GroupedTuning, grouped_tuning

T = GroupedTuning
HT = {"half_tail": True}
# Per head dim: today's tiles, then 128-row tiles with half-height tails (81% useful rows at
# 128 +- 22 rows per group where 128-row tiles had 69%), other stage counts and BLOCK_N.
GROUPED = {
    128: [
        T(64, 64, 4, 3),
        T(64, 64, 4, 3, **HT),
        T(128, 128, 8, 3),
        T(128, 128, 8, 3, **HT),
        T(128, 64, 8, 3, **HT),
        T(128, 64, 8, 4, **HT),
        T(128, 128, 8, 3, programs_per_sm=1, **HT),
        T(128, 128, 8, 3, warp_specialize=True, **HT),
        T(128, 64, 8, 3, pipe_qk=True, **HT),  # QK^T one key block ahead (session 16)
    ],
    64: [
        T(64, 64, 4, 3),
        T(64, 128, 4, 4),
        T(128, 64, 8, 3, **HT),
        T(128, 128, 8, 3, **HT),
        T(128, 128, 8, 4, **HT),
        T(128, 64, 4, 3, **HT),
        T(128, 64, 8, 4, **HT),
        T(128, 128, 8, 3, pipe_qk=True, **HT),
        T(64, 128, 4, 3, pipe_qk=True),
    ],
}
# `--high-g`: G >= 4 at B = 1,024 (128-256 rows per (chunk, KV head) group; 0.30-0.62 of the
# read floor in session 15): deeper or shallower pipelines (more programs per SM), wider key
# blocks at 64 rows, 256-row tiles (a G = 8 group's K/V streamed once, not 2-4 times through
# L2: each tile of a group re-reads the chunk's 2 MB from L2, and at 128 +- 22 rows 64-row
# tiles made 2.45 tiles a group; docs/performance-notes.md), also as 16 warps (4 warpgroups
# of 64 rows, registers of a 64-row tile each), and the two best 128-row tiles of session 15
# again in the same run.
HIGH_G = {
    128: [
        T(64, 64, 4, 4),
        T(64, 64, 4, 2),
        T(64, 128, 4, 2),
        T(64, 64, 4, 3, programs_per_sm=4),
        T(128, 128, 8, 2, **HT),
        T(128, 128, 8, 3, programs_per_sm=1, **HT),
        T(128, 128, 8, 3, warp_specialize=True, **HT),
        T(256, 64, 8, 2, **HT),  # a 256-row group's K/V read once (G 8); may spill
        T(256, 64, 16, 2, **HT),  # 4 warpgroups of 64 rows share each K/V block
        T(256, 128, 16, 2, **HT),
        T(128, 64, 8, 2, **HT),  # 96 KB of shared memory: 2 programs an SM
        T(128, 32, 8, 3, **HT),  # 80 KB and ~110 registers: 2 programs an SM
    ],
    64: [
        T(256, 64, 8, 2, **HT),  # a 256-row group's K/V read once (G 8): 64 + 64 regs
        T(256, 64, 8, 3, **HT),
        T(256, 128, 16, 2, **HT),  # 4 warpgroups of 64 rows share each K/V block
        T(128, 64, 8, 2, **HT),
        T(64, 128, 4, 2),
        T(64, 64, 4, 4),
        T(64, 256, 4, 2),
        T(64, 128, 8, 3),
        T(128, 128, 8, 2, **HT),
        T(128, 64, 4, 3, **HT),
    ],
}
SINGLE = {
    128: [T(16, 128, 4, 3), T(64, 64, 4, 3), T(128, 128, 8, 3),
          T(128, 128, 8, 3, programs_per_sm=1), T(128, 64, 8, 4),
          T(128, 128, 8, 3, warp_specialize=True)],
    64: [T(16, 128, 4, 3), T(64, 128, 4, 3), T(128, 128, 8, 3), T(128, 64, 8, 3),
         T(128, 128, 8, 4), T(128, 64, 4, 3)],
}  # fmt: skip
DRY_TILES = [T(32, 32, 4, 1, use_tma=False), T(32, 32, 4, 1, use_tma=False, **HT)]


def variants(
    case: str, d: int, g: int, rows: float, dry: bool, high_g: bool = False
) -> dict[str, GroupedTuning]:
    """The table's tile first ("table:<tag>"), then the case's variants not equal to it
    (`high_g`: the HIGH_G list for grouped points)."""
    table = grouped_tuning(d, g, rows)
    cands = DRY_TILES if dry else (GROUPED if case == "grouped" else SINGLE)[d]
    if high_g and case == "grouped" and not dry:
        cands = HIGH_G[d]
    out = {f"table:{tag(table)}": table}
    out |= {tag(t): t for t in cands if t != table and (t.block_m >= 32 or rows <= 256)}
    return out  # 16-row tiles only where few rows (they run on the older, slower MMA)
