"""`moska bench load` compares each library 429 with the library probe nearest in prompt
length (a short and a long one), and keeps each 429's promise beside what it waited."""

from __future__ import annotations

import random

from moska.bench.load import make_body
from moska.bench.load_drain import (
    LIBRARY_PROBE_CHARS,
    PLAIN_PROBE_CHARS,
    compare_429s,
    library_by_probe,
    probe_bodies,
)


def test_each_429_is_compared_with_the_nearest_probe_of_its_kind():
    probes = {
        "plain": {"status": 200, "prompt_chars": 42},
        "library": {"status": 200, "prompt_chars": 244},
        "library_short": {"status": 200, "prompt_chars": 48},
    }
    opened = {"plain": 2.0, "library": 9.0, "library_short": 4.0}
    rec = {"retry_after": "3", "at_door": False, "t_status": 0.5}
    rejected = [
        rec | {"library": True, "prompt_chars": 60, "retry_after_ms": "3200"},
        rec | {"library": True, "prompt_chars": 200, "retry_after_ms": "8000"},
        rec | {"library": False, "prompt_chars": 200, "retry_after_ms": "1000"},
        rec | {"library": True, "prompt_chars": 20, "retry_after": None},  # no header: left out
    ]
    rows = compare_429s(rejected, probes, opened)
    assert [r["probe"] for r in rows] == ["library_short", "library", "plain"]
    assert [r["observed_s"] for r in rows] == [3.5, 8.5, 1.5]
    assert [r["promised_s"] for r in rows] == [3.2, 8.0, 1.0]
    # a kind whose probe was never admitted has nothing to compare with
    assert compare_429s(rejected[:1], probes, {"plain": 2.0}) == []
    # library 429s apart by probe: the long one (the idle-only line) and the short one
    long = rows[1] | {"promised_s": 2.0}  # 2.0 / 8.5: not within 2x
    split = library_by_probe([rows[0], rows[1], long, rows[2]])
    assert split["library"] == {"n": 2, "within_2x": 0.5, "p50": 8.0 / 8.5}
    assert split["library_short"] == {"n": 1, "within_2x": 1.0, "p50": 3.2 / 3.5}


def test_the_short_library_probe_is_a_short_library_request():
    probes = probe_bodies(lambda r, lib: make_body(r, "m", 4, lib, 0), random.Random(1), "demo")
    assert set(probes) == {"plain", "library", *LIBRARY_PROBE_CHARS, *PLAIN_PROBE_CHARS}
    assert len(probes["library_short"]["prompt"]) == 48 < len(probes["library"]["prompt"])
    sizes = [len(probes[n]["prompt"]) for n in ("library_tiny", "library_mid", "library_long")]
    assert sizes == [16, 96, 160] and all(
        probes[n]["library"] == "demo" for n in probes if not n.startswith("plain")
    )
    assert probes["library_short"]["library"] == "demo" and "library" not in probes["plain"]
    plain = probe_bodies(lambda r, lib: make_body(r, "m", 4, lib, 0), random.Random(1), None)
    assert set(plain) == {"plain", *PLAIN_PROBE_CHARS}
    assert [len(plain[n]["prompt"]) for n in PLAIN_PROBE_CHARS] == [96, 160, 240]
    assert not any("library" in b for b in plain.values())


def test_the_observed_drain_is_an_interval_of_the_probes_period():
    """A probe admitted when sent at 2.0, every 0.25 s: reopening came in (1.75, 2.0]. A
    429 at 1.5 waited 0.25-0.5 s, so 0.16 promised is within 2x; one at 1.99 (after the
    last refused probe went out) could retry at once: 0.1 promised is within 2x of
    [0, 0.25] (the point, 0.01 s, said 10x too long); 0.05 promised at 0.5 (1.25-1.5 s
    seen) is not."""
    from moska.bench.load_drain import within_2x_band

    probes = {"plain": {"status": 200, "prompt_chars": 42}}
    rec = {"library": False, "prompt_chars": 40, "retry_after": "1", "at_door": True}
    rejected = [
        rec | {"t_status": 1.5, "retry_after_ms": "160"},
        rec | {"t_status": 1.99, "retry_after_ms": "100"},
        rec | {"t_status": 0.5, "retry_after_ms": "50"},
    ]
    rows = compare_429s(rejected, probes, {"plain": 2.0}, resolution_s=0.25)
    assert [(r["observed_lo_s"], r["observed_hi_s"]) for r in rows] == [
        (0.25, 0.5),
        (0.0, 0.25),
        (1.25, 1.5),
    ]
    assert [within_2x_band([r]) for r in rows] == [1.0, 1.0, 0.0]
    assert within_2x_band(rows) == 2 / 3 and within_2x_band([]) is None
    # without a period the interval is the point, as before
    point = compare_429s(rejected, probes, {"plain": 2.0})
    assert all(r["observed_lo_s"] == r["observed_s"] == r["observed_hi_s"] for r in point[:1])
