"""The tile sweep's output feeds the tuning table: its entries, pasted as Python, make
`grouped_tuning` pick each measured point's best tile (pure Python, no kernel runs)."""

import dataclasses

from moska.bench.kernels_shapes import CANDIDATES, as_python, table_entries
from moska.kernels.shared_tuning import GroupedTuning, TuneEntry, grouped_tuning


def test_table_entries_round_trip_to_the_lookup():
    a, b, c = CANDIDATES[0], CANDIDATES[3], CANDIDATES[8]
    best = [  # rows per group of B = 64 / 256 / 1,024 / 4,096 at G = 4 (out of order)
        {"rows_per_group": 32.0, "tuning": dataclasses.asdict(b)},
        {"rows_per_group": 8.0, "tuning": dataclasses.asdict(a)},
        {"rows_per_group": 128.0, "tuning": dataclasses.asdict(b)},  # same as 32: merged
        {"rows_per_group": 512.0, "tuning": dataclasses.asdict(c)},
    ]
    entries = table_entries(128, 4, best)
    assert [e["min_rows"] for e in entries] == [0, 16.0, 256.0]  # geometric midpoints
    src = as_python(entries)
    table = eval(f"({src})", {"TuneEntry": TuneEntry, "GroupedTuning": GroupedTuning})
    assert len(table) == 3
    for x in best:
        assert grouped_tuning(128, 4, x["rows_per_group"], table) == GroupedTuning(**x["tuning"])
    assert grouped_tuning(128, 3, 10, table) == a  # G = 3 takes G = 4's entries
