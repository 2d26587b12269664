"""The kernel benchmark's own pieces: the varlen-tile baseline (its plan addresses each chunk
in place; the CPU path runs the same plan through the reference) and the floor check."""

import itertools

import pytest
import torch

from moska.bench.bandwidth import check_floors, fractions_over, measure_ceilings
from moska.bench.kernels_baseline import baseline_step, dense_reference, tile_plan


def _routed_step(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, c, k = 7, 4, 2, 16, 5, 2
    lens = torch.randint(3, 12, (c,), generator=g)  # ragged chunks
    offs = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).int()
    s = int(offs[-1])
    kv = [torch.randn(s, hkv, d, generator=g) for _ in range(2)]
    q = torch.randn(b, hq, d, generator=g)
    uniq = [torch.randn(b, 5, hkv, d, generator=g) for _ in range(2)]
    chunk = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)])
    chunk[:5, 0] = 1  # one hot chunk: its rows span several tiles
    chunk[:5, 1] = torch.tensor([0, 2, 3, 4, 0])
    req = torch.arange(b)[:, None].expand(b, k).flatten()
    key = torch.sort(chunk.flatten() * b + req).values
    return q, kv, offs, key % b, key // b, uniq, d**-0.5


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_baseline_step_matches_dense_attention(tile):
    q, (k, v), offs, pr, pc, (ku, vu), scale = _routed_step(tile)
    out = baseline_step(q, k, v, offs, pr, pc, ku, vu, scale, tile=tile)
    ref = dense_reference(q, k, v, offs, pr, pc, ku, vu, scale)
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_tile_plan_addresses_each_chunk_in_place():
    _, _, offs, _, pc, _, _ = _routed_step(0)
    g, tile = 2, 3
    plan = tile_plan(pc, offs, g, tile)
    rows = torch.bincount(pc, minlength=offs.numel() - 1) * g
    lens = (offs[1:] - offs[:-1]).tolist()
    cu_q, cu_k, used = plan.cu_q.tolist(), plan.cu_k.tolist(), plan.used_k.tolist()
    assert cu_q[-1] == pc.numel() * g and all(a <= b for a, b in itertools.pairwise(cu_q))
    covered = [0] * len(lens)
    for t, n in enumerate(used):
        nq = cu_q[t + 1] - cu_q[t]
        assert 0 <= nq <= tile
        if n == 0:
            assert nq == 0  # padding tile
            continue
        c = offs.tolist().index(cu_k[t])
        assert n == lens[c]
        covered[c] += nq
    assert covered == rows.tolist()


def test_floor_check_flags_fractions_above_one():
    payload = {"rows": [{"roofline_fraction": 0.97}, {"floor_fraction": 1.02}], "ms": 3.0}
    assert fractions_over(payload) == ["rows[1].floor_fraction=1.0200"]
    check_floors(payload)
    assert payload["floor_check"]["ok"] is False
    ok = {"summary": {"grouped_floor_fraction_b64": 0.99}}
    check_floors(ok)
    assert ok["floor_check"] == {"limit": 1.0, "ok": True, "over": []}


def test_read_ceiling_is_measured_on_cpu():
    c = measure_ceilings("cpu", gib=1 / 256, reps=1, gemm=False)
    assert c["read_bytes_per_s"] == max(v for v in c["read_streams"].values())
    assert c["read_bytes_per_s"] > 0 and c["copy_bytes_per_s"] > 0
