"""step_corun (#22.3 / #17.3): its config tokens, and a dry run whose every (shared, unique)
pair computes the default pair's step on the interpreter (fp32, fresh random inputs)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from moska.bench.step_corun import main, parse_spec


def test_parse_spec_reads_each_token_and_refuses_bad_ones():
    assert parse_spec("table", 132) == {}
    assert parse_spec("p1s2", 132) == {"max_programs": 132, "num_stages": 2}
    assert parse_spec("m128n64w8h1", 4) == {
        "block_m": 128, "block_n": 64, "num_warps": 8, "half_tail": True
    }  # fmt: skip
    assert parse_spec("n32w1x3", 2) == {"block_n": 32, "num_warps": 1, "num_splits": 3}
    for bad in ("q1", "p", "n32z"):
        with pytest.raises(ValueError, match="bad config token"):
            parse_spec(bad, 2)


def test_dry_run_checks_every_pair_against_the_default(tmp_path):
    out = tmp_path / "corun.json"
    args = ["--cpu-dry-run", "--shared", "table", "p1", "--unique", "default", "n16w2",
            "--routers", "none", "two_stage", "--schedules", "prio", "route_first",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert "error" not in row
    # every pair and schedule ran, the default pair twice (the run's drift)
    steps = [k for k in row["step_ms"] if not k.endswith("|runs")]
    assert len([k for k in steps if k.startswith("none|prio|")]) == 4
    assert len([k for k in steps if k.startswith("two_stage|route_first|")]) == 4
    assert len(row["step_ms"]["none|prio|table|default|runs"]) == 2
    assert res["summary"]["max_relerr"] < 1e-4
    assert set(row["floors"]) == {"none", "two_stage"}
    assert all(f["floor_ms"] > 0 for f in row["floors"].values())
