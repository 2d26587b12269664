"""The fidelity plot reads both summary layouts and draws one panel per setting."""

import json

from moska.bench.plot_fidelity import panels, plot


def test_panels_by_signal_and_combined_layout(tmp_path):
    by_signal = {
        "retrieval": {
            "all_chunks": {"1.0": {"all": 1.0, "prefix-256": 1.0}},
            "default": {"0.5": {"all": 1.0, "prefix-256": 0.9}, "0.125": {"prefix-256": 0.7}},
        },
        "code": "refused: dense accuracy 0.5",
    }
    got = panels(by_signal)
    assert list(got) == [("retrieval", "prefix-256")]  # all-chunks, 'all', refusals left out
    assert got[("retrieval", "prefix-256")]["default"] == [(0.125, 0.7), (0.5, 0.9)]
    combined = {"default": {"0.25": {"networkx-prefix-64": 0.95, "sympy-prefix-64": 0.4}}}
    assert set(panels(combined)) == {("code", "networkx-prefix-64"), ("code", "sympy-prefix-64")}
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"summary": by_signal}))
    png = plot([str(path)], str(tmp_path / "f.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_each_signal_draws_its_own_targets(tmp_path, monkeypatch):
    """Issue 17's targets: retrieval keeps 0.9 / 0.95 of dense at 12.5 / 25% of chunks,
    code keeps 0.9 of the library's loss gain at 25% (its panels once showed the
    retrieval marks)."""
    from matplotlib.axes import Axes

    calls = []
    real = Axes.plot

    def spy(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    retrieval = {"retrieval": {"default": {"0.125": {"prefix-256": 1.0}}}}
    code = {"default": {"0.25": {"sympy-prefix-64": 0.7}}}
    paths = []
    for name, summary in (("r", retrieval), ("c", code)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"summary": summary}))
    plot([str(p) for p in paths], str(tmp_path / "t.png"))
    marks: dict[str, set] = {}
    for ax, args, kwargs in calls:
        if kwargs.get("color") == "red":
            marks.setdefault(ax.get_title(), set()).add((args[0][0], args[1][0]))
    assert marks == {
        "prefix-256 (r)": {(0.125, 0.90), (0.25, 0.95)},
        "sympy-prefix-64 (c)": {(0.25, 0.90)},
    }
