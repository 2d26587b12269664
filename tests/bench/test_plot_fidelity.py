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
