"""The FP8 attention benchmark's dry form still runs the way the device command runs it
(`python -m moska.bench.fp8_attention --routing uniform --batch 1024 --variants fp8_mma_vt
fp8_mma_qsplit_vt`, here with --cpu-dry-run): the token-major V variants check out against
the reference and their algorithm, and the JSON carries their rows and summary."""

import json
import os

import pytest
import torch

from moska.bench import fp8_attention

VARIANTS = ["fp8_mma_vt", "fp8_mma_qsplit_vt"]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only (TRITON_INTERPRET=1)"
)
def test_fp8_attention_dry_run_of_the_mma_variants(tmp_path, monkeypatch):
    # the dry shape cut further (one KV head, D 32, 4 chunks of 64): the interpreter's time
    monkeypatch.setattr(
        fp8_attention, "DRY", fp8_attention.Shape(2, 1, 32, 64, 4, 2, torch.float16, "cpu")
    )
    argv = ["--cpu-dry-run", "--routing", "uniform", "--batch", "1024", "--sample", "1"]
    out = tmp_path / "fp8.json"
    assert fp8_attention.main([*argv, "--variants", *VARIANTS, "--out", str(out)]) == 0
    data = json.loads((tmp_path / "fp8_cpu_dry_run.json").read_text())
    assert data["summary"]["correct"] is True
    assert set(data["summary"]["speedup_vs_bf16_at_largest_batch"]) == {
        f"uniform/{n}" for n in VARIANTS
    }
    for row in data["rows"]:
        assert row["routing"] == "uniform" and set(row["correctness"]) == {"bf16", *VARIANTS}
        for n in VARIANTS:
            err = row["correctness"][n]
            assert err["ok"] and err["o_rel_err_vs_algorithm"] < 2e-2, (n, err)
            assert row[n]["ms"] > 0
