"""What a request costs the server's event loop by how it ends (bench/load_door_cost.py): a
door 429, and an admitted request streamed as the load bench's, on the built-in model."""

from __future__ import annotations

import json

from moska.bench.load_door_cost import main


def test_an_admitted_stream_costs_the_loop_more_than_a_door_429(tmp_path):
    out = tmp_path / "cost.json"
    assert main(["--requests", "12", "--concurrency", "4", "--variants", "door,admitted",
                 "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["door"]["status"] == {"429": 12} and rows["admitted"]["status"] == {"200": 12}
    per = record["summary"]["loop_cpu_us_per_429"]  # the ratio is None when the door's
    assert per["admitted"] > per["door"]  # loop CPU reads 0 (once under -n 2)
    ratio = record["summary"]["admitted_over_door"]
    assert ratio is None or ratio > 1.0  # reading, streaming 16 chunks
