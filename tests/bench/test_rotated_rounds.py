"""The kernel benches' timing rounds (`kernels_one_chunk.rotated_rounds`, also used by the
Gluon benches): every call timed once a round, the order rotated and every other round
reversed, so no call is always first."""

from moska.bench.kernels_one_chunk import rotated_rounds


def test_every_call_once_a_round_rotated_and_every_other_round_reversed():
    runs = {name: (lambda name=name: name) for name in "abcd"}
    calls: list[str] = []

    def measure(fn) -> float:
        calls.append(fn())
        return float(len(calls))  # the call's position in the whole sequence

    times = rotated_rounds(runs, 4, measure)
    rounds = ["".join(calls[i : i + 4]) for i in range(0, 16, 4)]
    assert rounds == ["abcd", "adcb", "cdab", "cbad"]  # abcd, bcda reversed, cdab, dabc reversed
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys("abcd", 4)
    assert all(calls[int(t) - 1] == k for k, v in times.items() for t in v)  # times by name
