"""bench/semshare_steady_windows.py: a window's speedup is total plain / total reuse time over
its paired queries, the warm value is over the stated warm queries, and a window's misses
are counted by class (synthetic rows with known answers)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import semshare_steady_windows as sw


def _rows(n, miss_every, on_hit=10.0, on_miss=30.0, off=25.0, pair_every=1):
    rows = []
    for q in range(n):
        miss = q % miss_every == 0
        r = {
            "q": q,
            "tokens": 100,
            "reused": 0 if miss else 80,
            "on_ms": on_miss if miss else on_hit,
        }
        r["class"] = "capacity" if miss else "hit"
        if q % pair_every == 0:
            r["off_ms"] = off
        rows.append(r)
    return rows


def test_total_time_ratio_and_warm_window():
    rows = _rows(1000, 4)  # every 4th query a miss: 25 misses a window
    windows, s = sw.summarize(rows)
    assert len(windows) == 10 and s["warm_queries"] == [100, 300]
    want = 100 * 25.0 / (75 * 10.0 + 25 * 30.0)  # 2500 / 1500
    assert all(abs(w["speedup"] - round(want, 3)) < 1e-9 for w in windows)
    assert s["warm_speedup"] == round(want, 3) and s["min_over_warm"] == 1.0 and s["met_80pct"]
    assert windows[0]["misses"] == 25 and windows[0]["classes"] == {"capacity": 25, "hit": 75}
    assert s["later_windows"][0] == [300, 400] and s["outliers"] == []


def test_a_slow_window_and_an_outlier_are_seen():
    rows = _rows(1000, 4)
    for r in rows[600:700]:  # every query of one window twice as slow with reuse
        r["on_ms"] *= 2
    rows[950]["on_ms"] = 500.0  # a compile inside the timed region: listed, kept
    windows, s = sw.summarize(rows)
    assert abs(s["min_over_warm"] - 0.5) < 1e-3 and not s["met_80pct"]
    assert s["outliers"] == [[950, 500.0, 25.0]] and s["outlier_ms"] == 75.0
    assert windows[9]["speedup"] < windows[8]["speedup"]  # the outlier counts in its window


def test_only_paired_queries_count():
    rows = _rows(400, 2, pair_every=2)  # misses are exactly the paired queries
    windows, _ = sw.summarize(rows)
    assert windows[1]["paired"] == 50 and windows[1]["speedup"] == round(25.0 / 30.0, 3)
    assert "x med" in sw.table(windows, sw.summarize(rows)[1])
