"""The tiles the shape sweep tries at each point (`moska.bench.kernels_shapes_tiles`): the
table's own tile first and once, the case's candidates after it."""

import pytest

from moska.bench.kernels_shapes_tiles import DRY_TILES, GROUPED, HIGH_G, SINGLE, variants
from moska.kernels.shared_tuning import grouped_tuning


@pytest.mark.parametrize("case,d,g,rows", [("grouped", 128, 4, 128.0), ("single", 64, 8, 512)])
def test_the_tables_tile_comes_first_and_only_once(case, d, g, rows):
    vs = variants(case, d, g, rows, dry=False)
    names, tiles = list(vs), list(vs.values())
    table = grouped_tuning(d, g, rows)
    assert names[0].startswith("table:") and tiles[0] == table
    assert table not in tiles[1:]
    pool = (GROUPED if case == "grouped" else SINGLE)[d]
    assert all(t in pool for t in tiles[1:]) and len(tiles) >= 2


def test_16_row_tiles_only_where_few_rows():
    assert any(t.block_m == 16 for t in SINGLE[128])
    few = variants("single", 128, 1, 16, dry=False)
    many = variants("single", 128, 1, 1024, dry=False)
    assert any(t.block_m == 16 for t in few.values())
    assert all(t.block_m >= 32 for t in many.values())


def test_high_g_and_dry_pick_their_own_lists():
    hg = list(variants("grouped", 64, 8, 256.0, dry=False, high_g=True).values())[1:]
    assert hg and all(t in HIGH_G[64] for t in hg)
    single = list(variants("single", 64, 8, 256, dry=False, high_g=True).values())[1:]
    assert all(t in SINGLE[64] for t in single)  # --high-g changes the grouped points only
    dry = list(variants("grouped", 64, 4, 64.0, dry=True, high_g=True).values())[1:]
    assert dry and all(t in DRY_TILES for t in dry)
