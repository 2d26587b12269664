"""Every model shape family: GQA ratio G = 1, 2, 4, 8 x head dim 64, 128 (the Llama 3,
Qwen2.5 and Mistral families), in the interpreter. The grouped kernel runs with every tile
of its tuning table for the shape (kernels/shared_tuning.py), the paged decode and prefill
kernels and the merge against their references, and the whole step (grouped + paged
decode + merge) against one dense softmax. One tiny problem per shape serves every test
of it. The interpreter costs ~1 s a launch on a busy box, so each shape runs in one dtype,
fp16 and fp32 alternating like a chessboard: every G and every D meets both dtypes. Other
files cover ragged corner cases (and both dtypes) at fewer shapes."""

import dataclasses
from functools import cache

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels import shared_attention, shared_tuning
from moska.kernels.merge import merge_selections, merge_selections_ref
from moska.kernels.paged_attention import (
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
)
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_tuning import GroupedTuning, entries_for, grouped_tuning

SHAPES = [(d, g) for d in shared_tuning.HEAD_DIMS for g in shared_tuning.GQA_RATIOS]
CASES = [
    (d, g, (torch.float16, torch.float32)[(i + j) % 2])
    for j, d in enumerate(shared_tuning.HEAD_DIMS)
    for i, g in enumerate(shared_tuning.GQA_RATIOS)
]
HKV, B, BS = 2, 2, 16
LENS = [45, 150]  # a chunk inside one block, one past a 128-key block
SEQ = [37, 70]  # unique context per request (decode: one query each)
Q_LENS = [1, 20]  # prefill: one token, a chunked prefill


@cache
def _problem(d: int, g: int, dtype: torch.dtype) -> dict:
    """Fresh random inputs of one shape (seeded by it), built once per process."""
    gen = torch.Generator().manual_seed(1000 * d + 10 * g + (dtype == torch.float16))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    offs = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    s = int(offs[-1])
    trip = sorted(
        (c, h, r)
        for c in range(len(LENS))
        for h in range(HKV)
        for r in range(B)
        if torch.rand((), generator=gen) < 0.7 or c == 1
    )  # chunk 1 read by every request on every head: groups of several rows
    t = torch.tensor(trip, dtype=torch.int32)
    sel = Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())
    need = [-(-n // BS) for n in SEQ]
    perm = torch.randperm(sum(need) + 1, generator=gen).int()
    bt = torch.full((B, max(need) + 1), int(perm[-1]), dtype=torch.int32)
    i = 0
    for r, n in enumerate(need):
        bt[r, :n] = perm[i : i + n]
        i += n
    p = {
        "q": randn(B, HKV * g, d),
        "k_pool": randn(s, HKV, d),
        "v_pool": randn(s, HKV, d),
        "offs": offs,
        "sel": sel,
        "k_cache": randn(sum(need) + 1, BS, HKV, d),
        "v_cache": randn(sum(need) + 1, BS, HKV, d),
        "bt": bt,
        "seq_lens": torch.tensor(SEQ, dtype=torch.int32),
        "scale": d**-0.5,
    }
    p["shared_ref"] = grouped_shared_attention_ref(
        p["q"], p["k_pool"], p["v_pool"], offs, sel, p["scale"]
    )
    return p


def _poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype), torch.full(shape[:-1], float("nan"))


def _grouped(p, g, tuning: GroupedTuning):
    """The grouped kernel with a table tile (block sizes, TMA flag, merge shape) and a small
    split target so that split-KV runs too (warps and stages mean nothing here)."""
    n, d = p["sel"].req.numel(), p["q"].shape[-1]
    return grouped_shared_attention(
        p["q"], p["k_pool"], p["v_pool"], p["offs"], p["sel"], p["scale"],
        block_m=tuning.block_m, block_n=tuning.block_n, use_tma=tuning.use_tma,
        warp_specialize=tuning.warp_specialize, merge_m=tuning.merge_m, split_b=tuning.split_b,
        target_programs=6, min_split=64, out=_poison((n, g, d), p["q"].dtype),
    )  # fmt: skip


@pytest.mark.parametrize("d,g,dtype", CASES)
def test_paged_prefill(d, g, dtype):
    p = _problem(d, g, dtype)
    kc, vc, bt, sl, sc = p["k_cache"], p["v_cache"], p["bt"], p["seq_lens"], p["scale"]
    hq = HKV * g
    cu = torch.tensor([0] + torch.tensor(Q_LENS).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q = torch.randn(t, hq, d, dtype=torch.float32).to(dtype)
    o, lse = paged_prefill_attention(q, kc, vc, bt, cu, sl, sc, out=_poison((t, hq, d), dtype))
    ro, rl = paged_attention_ref(q, kc, vc, bt, cu, sl, sc)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4


@pytest.mark.parametrize("d,g,dtype", CASES)
def test_step_every_table_tile(d, g, dtype):
    """Grouped shared attention with every table tile of the shape against its reference;
    with the tile the table picks for these rows, merged with paged decode (against its
    reference) over the unique KV: the merge against its reference, the step against one
    softmax over each request's chosen chunks ++ its own context."""
    p = _problem(d, g, dtype)
    q, kp, vp, sel, sc, offs = p["q"], p["k_pool"], p["v_pool"], p["sel"], p["scale"], p["offs"]
    kc, vc, bt, sl = p["k_cache"], p["v_cache"], p["bt"], p["seq_lens"]
    entries = entries_for(d, g)
    assert entries, f"no tuning table entry for D={d}, G={g}"
    rows = sel.req.numel() * g / min(sel.req.numel(), len(LENS) * HKV)
    picked = grouped_tuning(d, g, rows)
    ro, rl = p["shared_ref"]
    for e in entries:
        o, lse = _grouped(p, g, e.tuning)
        assert o.dtype == dtype and lse.dtype == torch.float32
        assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4, e
        if e.tuning == picked:
            o_s, lse_s = o, lse
    hq = HKV * g
    o_u, lse_u = paged_decode_attention(
        q, kc, vc, bt, sl, sc, num_splits=2, out=_poison((B, hq, d), dtype)
    )
    ru, rlu = paged_attention_ref(q, kc, vc, bt, torch.arange(B + 1, dtype=torch.int32), sl, sc)
    assert rel_err(o_u, ru) < TOL[dtype] and rel_err(lse_u, rlu) < 1e-4
    o, lse = merge_selections(o_u, lse_u, o_s, lse_s, sel)
    ro, rl = merge_selections_ref(o_u, lse_u, o_s, lse_s, sel)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-5
    req, head, chunk = sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()
    for r in range(B):
        uk = kc[bt[r].long()].reshape(-1, HKV, d)[: SEQ[r]].float()
        uv = vc[bt[r].long()].reshape(-1, HKV, d)[: SEQ[r]].float()
        for h in range(HKV):
            cs = [c for c, rr, hh in zip(chunk, req, head) if rr == r and hh == h]
            keys = [kp[offs[c] : offs[c + 1], h].float() for c in cs] + [uk[:, h]]
            vals = [vp[offs[c] : offs[c + 1], h].float() for c in cs] + [uv[:, h]]
            s = q[r, h * g : (h + 1) * g].float() @ torch.cat(keys).T * sc  # [G, L]
            want = torch.softmax(s, -1) @ torch.cat(vals)
            assert rel_err(o[r, h * g : (h + 1) * g], want) < TOL[dtype]
            assert rel_err(lse[r, h * g : (h + 1) * g], torch.logsumexp(s, -1)) < 1e-4


def test_tuning_table_lookup():
    # today's tiles stay for the shape they were measured on (Hq 32 / Hkv 8 / D 128)
    small = GroupedTuning(block_m=64, block_n=64, num_warps=4, num_stages=3)
    large = GroupedTuning(block_m=128, block_n=128, num_warps=8, num_stages=3)
    assert grouped_tuning(128, 4, 8) == grouped_tuning(128, 4, 255.9) == small
    assert grouped_tuning(128, 4, 256) == grouped_tuning(128, 4, 4096) == large
    # G = 8 takes the large tile from 128 rows (one chunk read by B = 16: 11 % faster)
    assert grouped_tuning(128, 8, 127.9) == small and grouped_tuning(128, 8, 128) == large
    for d, g in SHAPES:
        assert grouped_tuning(d, g, 0).block_m >= 16
        assert entries_for(d, g)[0].min_rows == 0  # every rows-per-group value has a tile
    # a G between entries takes the next larger G's; past the largest, the largest's
    t = (
        shared_tuning.TuneEntry(64, 2, 0, small),
        shared_tuning.TuneEntry(64, 8, 0, large),
        shared_tuning.TuneEntry(64, 8, 100, small),
    )
    assert grouped_tuning(64, 1, 5, t) == small and grouped_tuning(64, 3, 5, t) == large
    assert grouped_tuning(64, 7, 100, t) == grouped_tuning(64, 16, 100, t) == small
    assert grouped_tuning(256, 4, 5, t) == shared_tuning.fallback(256)  # no D = 256 entry
    cfg = large.launch_config(sms=132)
    assert cfg["target_programs"] == 264 and "programs_per_sm" not in cfg
    with pytest.raises(dataclasses.FrozenInstanceError):  # a tuning is a value
        large.block_m = 32  # type: ignore[misc]


def test_default_config_on_cuda_reads_the_table(monkeypatch):
    """The launcher's CUDA default is the table's tile for (D, G, rows per group): checked
    without a GPU by answering the SM count."""

    class _Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _dev: _Props())
    cuda = torch.device("cuda")
    for d, g in SHAPES:
        for rows in (2.0, 64.0, 256.0, 1024.0):
            want = grouped_tuning(d, g, rows).launch_config(132)
            assert shared_attention._default_config(d, g, cuda, rows) == want
    assert shared_attention._default_config(128, 4, cuda, 512)["block_m"] == 128
    assert shared_attention._default_config(128, 4, torch.device("cpu"), 512)["block_m"] == 64
