"""The one-chunk bench's table: per (head dim, G), each measured point takes the faster of
our best Triton variant and the best SDPA call with LSE, and the launcher's lookup follows
it; a point's summary compares with the best baseline without LSE and with it (pure Python)."""

from moska.bench.kernels_one_chunk_report import one_chunk_table, point_summary
from moska.kernels.shared_tuning import OneChunkEntry, one_chunk_backend


def _pt(d, g, b, tri, cudnn, flash=9.0):
    ms = {"triton:table:x": tri, "sdpa:cudnn": cudnn, "sdpa:flash": flash, "dispatch": tri}
    return {"D": d, "G": g, "B": b, "rows": b * g, "ms": ms}


def test_table_follows_the_faster_side_point_by_point():
    pts = [
        _pt(128, 8, 1024, 1.0, 0.9),  # out of order on purpose
        _pt(128, 8, 16, 1.0, 1.5),
        _pt(128, 8, 64, 1.0, 1.2),
        _pt(128, 8, 256, 1.0, 0.98),  # SDPA from 2,048 rows
        _pt(128, 4, 1024, 1.0, 1.01),  # G 4: ours everywhere
        _pt(64, 2, 256, 1.0, 0.9, flash=0.8),  # flash is the faster SDPA call here
        _pt(64, 2, 1024, 1.0, 1.1),  # ours again at more rows
    ]
    table = one_chunk_table(pts)
    assert table == [
        {"head_dim": 64, "gqa": 2, "min_rows": 0, "backend": "flash"},
        {"head_dim": 64, "gqa": 2, "min_rows": 2048, "backend": "triton"},
        {"head_dim": 128, "gqa": 4, "min_rows": 0, "backend": "triton"},
        {"head_dim": 128, "gqa": 8, "min_rows": 0, "backend": "triton"},
        {"head_dim": 128, "gqa": 8, "min_rows": 2048, "backend": "cudnn"},
    ]
    entries = tuple(OneChunkEntry(**e) for e in table)
    bf16 = "torch.bfloat16"
    assert one_chunk_backend(128, 8, 4096, bf16, "cuda", entries) == "cudnn"
    assert one_chunk_backend(128, 8, 2047, bf16, "cuda", entries) == "triton"
    assert one_chunk_backend(64, 2, 600, bf16, "cuda", entries) == "flash"


def test_point_summary_against_the_best_baseline_and_the_floor():
    pt = _pt(128, 1, 64, 0.2, 0.3, flash=0.25)
    pt |= {"dispatch_backend": "triton", "bytes": 4.0e8, "flops": 1.0}
    pt["baselines"] = {"ms": {"flash_graph": 0.25, "flash_eager": 0.24, "cudnn_graph": 0.5}}
    s = point_summary(pt, bw=4.0e12, peak=1.0e15)  # read floor 0.1 ms
    assert s["bound"] == "read" and s["floor_ms"] == 0.1
    assert s["baseline"] == "flash_eager" and s["dispatch_vs_baseline"] == 1.2
    assert s["baseline_lse"] == "sdpa:flash" and s["dispatch_vs_baseline_lse"] == 1.25
    assert s["dispatch_floor_fraction"] == 0.5 and s["triton_floor_fraction"] == 0.5


def test_paired_ratios_compare_calls_round_by_round():
    # a clock that drifts between rounds moves both calls of a round: the paired ratio sees
    # the dispatcher tie the call it makes, where the best rounds alone differ by 10 %
    pt = _pt(128, 8, 1024, 7.0, 6.4)
    pt |= {"dispatch_backend": "cudnn", "bytes": 4.0e9, "flops": 1.0e12}
    pt["baselines"] = {"ms": {"cudnn_graph": 6.4}}
    pt["rounds_ms"] = {
        "triton:table:x": [7.6, 7.9, 7.8],
        "sdpa:cudnn": [6.4, 7.1, 7.0],
        "dispatch": [7.04, 7.1, 7.0],
        "base:cudnn_graph": [6.3, 7.0, 6.9],
    }
    pt["ms"] |= {"dispatch": 7.0}
    s = point_summary(pt, bw=4.0e12, peak=1.0e15)
    assert s["dispatch_same_call"] == "sdpa:cudnn"
    assert s["dispatch_vs_same_call_paired"] == 1.0  # median of 0.909, 1.0, 1.0
    assert s["dispatch_vs_baseline_paired"] == round(6.9 / 7.0, 3)
    assert s["dispatch_vs_baseline"] == round(6.4 / 7.0, 3)  # best rounds: 0.914


def test_table_with_rounds_follows_the_paired_ratio():
    # cuDNN's best round (6.0) beats ours (6.5), but round by round ours is faster
    pt = _pt(128, 4, 1024, 6.5, 6.0)
    pt["rounds_ms"] = {"triton:table:x": [6.5, 7.5, 7.4], "sdpa:cudnn": [7.0, 7.7, 6.0]}
    assert one_chunk_table([pt]) == [
        {"head_dim": 128, "gqa": 4, "min_rows": 0, "backend": "triton"}
    ]
    pt["rounds_ms"]["sdpa:cudnn"] = [6.3, 7.2, 7.3]  # faster in two rounds of three
    assert one_chunk_table([pt])[0]["backend"] == "cudnn"
