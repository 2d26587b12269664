"""The one-chunk bench's table: per head dim, SDPA from the fewest rows where it beat every
Triton variant at every larger point (any G), and the launcher's lookup follows it; a point's
summary compares with the best of the graph-replayed and eager baselines (pure Python)."""

from moska.bench.kernels_one_chunk import one_chunk_table, point_summary
from moska.kernels.shared_tuning import OneChunkEntry, one_chunk_backend


def _pt(d, rows, tri, cudnn, flash=9.0):
    return {
        "D": d,
        "rows": rows,
        "ms": {"triton:table:x": tri, "sdpa:cudnn": cudnn, "sdpa:flash": flash, "dispatch": tri},
    }


def test_table_cuts_where_sdpa_wins_from_there_up():
    pts = [
        _pt(128, 256, 1.0, 1.5),
        _pt(128, 1024, 1.0, 0.98),  # SDPA wins here, but loses at a larger point (other G)
        _pt(128, 2048, 1.0, 1.01),
        _pt(128, 2048, 1.0, 0.9),
        _pt(128, 4096, 1.0, 0.95),
        _pt(64, 1024, 1.0, 1.1),  # D 64: Triton everywhere
    ]
    table = one_chunk_table(pts)
    assert {"head_dim": 128, "min_rows": 4096, "backend": "cudnn"} in table
    assert [e for e in table if e["head_dim"] == 64] == [
        {"head_dim": 64, "min_rows": 0, "backend": "triton"}
    ]
    entries = tuple(OneChunkEntry(**e) for e in table)
    bf16 = "torch.bfloat16"
    assert one_chunk_backend(128, 4096, bf16, "cuda", entries) == "cudnn"
    assert one_chunk_backend(128, 2048, bf16, "cuda", entries) == "triton"
    assert one_chunk_backend(64, 1 << 16, bf16, "cuda", entries) == "triton"


def test_point_summary_against_the_best_baseline_and_the_floor():
    pt = _pt(128, 64, 0.2, 0.3) | {"dispatch_backend": "triton", "bytes": 4.0e8, "flops": 1.0}
    pt["baselines"] = {"ms": {"flash_graph": 0.25, "flash_eager": 0.24, "cudnn_graph": 0.5}}
    s = point_summary(pt, bw=4.0e12, peak=1.0e15)  # read floor 0.1 ms
    assert s["bound"] == "read" and s["floor_ms"] == 0.1
    assert s["baseline"] == "flash_eager" and s["dispatch_vs_baseline"] == 1.2
    assert s["dispatch_floor_fraction"] == 0.5 and s["triton_floor_fraction"] == 0.5
