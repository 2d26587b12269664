"""The own-retry ceiling's map (load_drain_ceiling): a reopening bracketed by a burst's dry
retries, and a promise judged within 2x for every reopening in the bracket or for some."""

from __future__ import annotations

import math

from moska.bench.load_drain_ceiling import bracket, burst_rows, judge, shares


def row(kind: str, chars: int, t: float, promise: float, half: bool, at: bool, double: bool):
    verdict = "long" if half else "within" if double else "short"
    retries = {
        "half": [promise / 2, half],
        "at": [promise, at],
        "double": [2 * promise, double],
    }
    return {
        "kind": kind,
        "at_door": True,
        "prompt_chars": chars,
        "t_status": t,
        "promised_s": promise,
        "retries": retries,
        "verdict": verdict,
    }


def test_the_bracket_is_the_last_refusal_before_the_first_admission():
    pts = [(0.5, "plain", 10, False), (0.9, "plain", 10, False), (1.0, "plain", 99, True)]
    pts += [(1.2, "plain", 10, True), (1.5, "library", 10, True)]
    assert bracket(pts, "plain", 0, 15) == (0.9, 1.0)  # plain: every length
    assert bracket(pts, "library", 10, 15) == (0.0, 1.5)
    assert bracket(pts, "library", 100, 15) == (0.0, math.inf)  # none near: never admitted


def test_judge_is_sure_only_for_every_reopening_in_the_bracket():
    # a 429 at 0, reopening in [0.9, 1.0]: D in [0.9, 1.0]
    assert judge(1.0, 0.0, 0.9, 1.0) == (True, True)
    assert judge(1.9, 0.0, 0.9, 1.0) == (False, True)  # within only if D >= 0.95
    assert judge(2.1, 0.0, 0.9, 1.0) == (False, False)
    assert judge(0.4, 0.0, 0.9, 1.0) == (False, False)  # under half of any D
    assert judge(0.1, 2.0, 0.9, 1.0) == (False, False)  # reopened before the 429: no D


def test_hindsight_knows_the_reopening_and_the_recorded_promise_does_not():
    rows = [row("plain", 40, 0.1 * i, 0.3, False, False, 0.1 * i + 0.6 >= 1.0) for i in range(6)]
    burst = {"clients": 300, "own_retry": {"rows": rows}}
    s = shares(burst_rows(burst, 15))
    assert s["n"] == 6
    assert s["hindsight_sure"] is not None and s["recorded_maybe"] is not None
    assert s["hindsight_sure"] > s["recorded_maybe"]  # one promise for all misses some
