"""The Gluon benches' summaries (pure Python): the one-chunk point against the Triton tile and
the better SDPA call, the grouped point against its read floor (and whether 0.9 of it is
reachable by the FLOP floor)."""

from moska.bench.kernels_gluon import summary, vtag
from moska.bench.kernels_gluon_grouped import summary as grouped_summary


def test_one_chunk_summary_picks_the_best_gluon_and_library_calls():
    ms = {"triton": 3.6, "sdpa:cudnn": 3.3, "sdpa:flash": 6.5}
    ms |= {"gluon:ws:m64n128w4s3p1": 3.4, "gluon:wso:m64n128w4s3p1": 3.2}
    pt = {"ms": ms, "bytes": 4.0e8, "flops": 2.2e12}
    s = summary(pt, bw=4.6e12, peak=8.0e14)  # floor: FLOPs, 2.75 ms
    assert s["bound"] == "compute" and s["floor_ms"] == 2.75
    assert s["gluon_best"] == "gluon:wso:m64n128w4s3p1" and s["library_best"] == "sdpa:cudnn"
    assert s["gluon_vs_library"] == round(3.3 / 3.2, 3) and s["gluon_vs_triton"] == 1.125
    assert s["gluon_floor_fraction"] == round(2.75 / 3.2, 3) < 1.0
    assert vtag(("wso", 64, 128, 4, 3, 1)) == "gluon:wso:m64n128w4s3p1"


def test_grouped_summary_reads_the_read_floor_and_its_reach():
    pt = {"ms": {"triton": 1.5, "gluon:ws:m64x2n128s3": 1.4}, "bytes": 4.3e9, "flops": 5.5e11}
    s = grouped_summary(pt, bw=4.6e12, peak=8.0e14)  # read 0.935 ms, FLOPs 0.6875 ms
    assert s["read_reachable"] and s["gluon_read_fraction"] == round(0.9348 / 1.4, 3)
    assert s["gluon_vs_triton"] == round(1.5 / 1.4, 3)
    g8 = {"ms": {"triton": 2.4}, "bytes": 4.3e9, "flops": 1.1e12}  # FLOPs 1.47x the read
    assert not grouped_summary(g8, bw=4.6e12, peak=8.0e14)["read_reachable"]
