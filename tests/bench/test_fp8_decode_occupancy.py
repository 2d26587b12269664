"""Session 27's FP8 benches on CPU: `fp8_decode` times each mode under every router it is
given (the summary keeps the default router's keys and adds the others'), and
`fp8_occupancy` takes the run's fastest bf16 as its baseline."""

import json

from moska.bench import fp8_decode, fp8_occupancy


def test_fp8_decode_times_each_router(tmp_path):
    out = tmp_path / "d.json"
    argv = ["--cpu-dry-run", "--modes", "bf16", "fp8_upcast", "--scorers", "keymax", "two_stage"]
    assert fp8_decode.main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    seen = {(r["mode"], r["scorer"]) for r in res["rows"]}
    assert seen == {(m, s) for m in ("bf16", "fp8_upcast") for s in ("keymax", "two_stage")}
    assert all(r["step_ms"] > 0 for r in res["rows"])
    summ = res["summary"]
    assert set(summ["B4_step_ms"]) == set(summ["B4_two_stage_step_ms"]) == {"bf16", "fp8_upcast"}
    ms = {(r["mode"], r["scorer"]): r["step_ms"] for r in res["rows"]}
    want = ms["bf16", "two_stage"] / ms["fp8_upcast", "two_stage"]
    assert abs(summ["B4_two_stage_fp8_upcast_vs_bf16"] - want) < 1e-3


def test_fp8_occupancy_baseline_is_the_fastest_bf16():
    row = {"batch": 1024, "fp8_read_floor_ms": 0.5, "check": {"bf16": {"ok": True}}}
    row["ms"] = {"bf16": 1.6, "bf16_m64n32s3_r168": 1.5, "fp8_engine": 1.0, "fp8_x": 0.9}
    fp8_occupancy.speedups(row)
    s = fp8_occupancy.summarize([row])
    assert s["bf16_best_b1024"] == "bf16_m64n32s3_r168"
    assert s["fp8_best_b1024"] == "fp8_x" and abs(s["fp8_best_speedup_b1024"] - 1.5 / 0.9) < 1e-9
    assert abs(s["fp8_engine_speedup_b1024"] - 1.5) < 1e-9
    assert abs(s["fp8_best_read_floor_fraction_b1024"] - 0.5 / 0.9) < 1e-9
    assert s["all_checked_ok_b1024"] is True
