import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import paged_decode_attention
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import (
    build_work_list,
    grouped_shared_attention,
    grouped_shared_attention_ref,
)

# Small blocks and splits so that the interpreter runs few programs yet covers row tiles
# that end inside a request, several tiles per group, and split-KV with a ragged last split.
SMALL = {"block_m": 16, "block_n": 32, "target_programs": 6, "min_split": 32}


def _offsets(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _selections(triples):
    t = torch.tensor(sorted(set(triples)), dtype=torch.int32).reshape(-1, 3)  # (chunk, kv, req)
    return Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())


def _run(q, k, v, offs, sel, scale, **kw):
    n, g, d = sel.req.numel(), q.shape[1] // k.shape[1], q.shape[2]
    o = torch.full((n, g, d), float("nan"), dtype=q.dtype)  # poison: every element is written
    lse = torch.full((n, g), float("nan"))
    return grouped_shared_attention(q, k, v, offs, sel, scale, out=(o, lse), **kw)


def _check(q, k, v, offs, sel, **kw):
    scale = q.shape[-1] ** -0.5
    o, lse = _run(q, k, v, offs, sel, scale, **kw)
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, sel, scale)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert rel_err(o, ro) < TOL[q.dtype]
    assert rel_err(lse, rl) < 1e-4


# each G once, dtypes alternating: fp32 at G = 1 and fp16 at G = 3 run in
# test_all_chunks_plus_unique_equals_dense and test_tma_path_matches_reference (G = 2, 4, 8
# at D 64/128, both dtypes: tests/kernels/test_shapes.py)
@pytest.mark.parametrize("dtype,g", [(torch.float16, 1), (torch.float32, 3), (torch.float16, 6)])
def test_ragged_chunks_random_selection(dtype, g):
    b, hkv, d = 5, 2, 64
    lens = [1, 70, 200, 33, 64]
    offs = _offsets(lens)
    s = int(offs[-1])
    q = torch.randn(b, hkv * g, d, dtype=dtype)
    k, v = torch.randn(s, hkv, d, dtype=dtype), torch.randn(s, hkv, d, dtype=dtype)
    triples = [
        (c, h, r)
        for c in range(len(lens))
        for h in range(hkv)
        for r in range(b)
        if torch.rand(()) < 0.6
    ]
    _check(q, k, v, offs, _selections(triples), **SMALL)


@pytest.mark.parametrize("dtype,g", [(torch.float16, 4), (torch.float32, 3)])
def test_head_dim_128(dtype, g):
    b, hkv, d = 3, 2, 128
    offs = _offsets([40, 97])
    s = int(offs[-1])
    q = torch.randn(b, hkv * g, d, dtype=dtype)
    k, v = torch.randn(s, hkv, d, dtype=dtype), torch.randn(s, hkv, d, dtype=dtype)
    triples = [
        (c, h, r) for c in range(2) for h in range(hkv) for r in range(b) if (c + r) % 2 == 0
    ]
    _check(q, k, v, offs, _selections(triples), **SMALL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunk_chosen_by_every_request(dtype):
    # One long chunk, 40 rows (e.g. 40 queries of one request in prefill): tiles and splits.
    b, hkv, g, d = 40, 1, 2, 64
    offs = _offsets([300])
    q = torch.randn(b, hkv * g, d, dtype=dtype)
    k, v = torch.randn(300, hkv, d, dtype=dtype), torch.randn(300, hkv, d, dtype=dtype)
    sel = _selections([(0, 0, r) for r in range(b)])
    _check(q, k, v, offs, sel, block_m=32, block_n=64, target_programs=8, min_split=64)
    work, meta, w_max = build_work_list(sel, offs, hkv, g, 32, 64, 8, 64)
    total, split_len = meta.tolist()
    n_split = int(work[4, 0])
    assert n_split > 1 and total == 3 * n_split <= w_max  # 80 rows = 3 tiles, each split
    # floor(300 / split_len) splits: 3 tiles x 2 splits = 6 items fit the target of 8
    # (a ceil would give 3 x 3 = 9, one more wave's worth than asked for)
    assert n_split == 300 // split_len and total <= 8


def test_default_config_and_one_token_chunks():
    b, hkv, g, d = 4, 2, 2, 64
    offs = _offsets([1, 1, 5])
    q = torch.randn(b, hkv * g, d)
    k, v = torch.randn(7, hkv, d), torch.randn(7, hkv, d)
    triples = [(c, h, r) for c in range(3) for h in range(hkv) for r in range(b) if r != c]
    _check(q, k, v, offs, _selections(triples))


def test_empty_selections():
    q, k = torch.randn(2, 4, 64), torch.randn(10, 2, 64)
    e = torch.zeros(0, dtype=torch.int32)
    o, lse = grouped_shared_attention(q, k, k, _offsets([10]), Selections(e, e, e), 0.1)
    assert o.shape == (0, 2, 64) and lse.shape == (0, 2)


def test_rejects_bad_input():
    q, k = torch.randn(2, 4, 64), torch.randn(10, 2, 64)
    sel = _selections([(0, 0, 0)])
    with pytest.raises(ValueError, match="dtypes differ"):
        grouped_shared_attention(q.half(), k, k, _offsets([10]), sel, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        grouped_shared_attention(torch.randn(2, 3, 64), k, k, _offsets([10]), sel, 0.1)
    with pytest.raises(ValueError, match="int32"):
        grouped_shared_attention(q, k, k, _offsets([10]).long(), sel, 0.1)
    with pytest.raises(ValueError, match="sel.chunk"):
        grouped_shared_attention(
            q, k, k, _offsets([10]), Selections(sel.req, sel.kv_head, sel.chunk.long()), 0.1
        )


# One point, the odd group G = 3: test_shapes.py's test_step_every_table_tile checks the same
# step (grouped + paged decode + merge against one dense softmax) at every G = 1, 2, 4, 8 and
# D = 64, 128, each D and G in both dtypes.
@pytest.mark.parametrize("dtype,g,d", [(torch.float16, 3, 64)])
def test_all_chunks_plus_unique_equals_dense(dtype, g, d):
    # Exactness identity: shared attention over ALL chunks merged with paged decode over the
    # unique KV equals one softmax over concat(shared, unique).
    b, hkv, bs = 3, 2, 16
    lens = [50, 1, 77]
    offs = _offsets(lens)
    s = int(offs[-1])
    q = torch.randn(b, hkv * g, d, dtype=dtype)
    k_pool, v_pool = torch.randn(s, hkv, d, dtype=dtype), torch.randn(s, hkv, d, dtype=dtype)
    seq = [9, 40, 16]
    max_blocks = 3
    k_cache = torch.randn(b * max_blocks + 1, bs, hkv, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = (torch.randperm(b * max_blocks + 1)[: b * max_blocks]).view(b, max_blocks).int()
    seq_lens = torch.tensor(seq, dtype=torch.int32)
    sel = _selections([(c, h, r) for c in range(len(lens)) for h in range(hkv) for r in range(b)])
    scale = d**-0.5
    o_s, lse_s = _run(q, k_pool, v_pool, offs, sel, scale, **SMALL)
    o_u, lse_u = paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=2
    )
    o, lse = merge_selections(o_u, lse_u, o_s, lse_s, sel)
    for r in range(b):
        uk = k_cache[block_tables[r].long()].reshape(-1, hkv, d)[: seq[r]]
        uv = v_cache[block_tables[r].long()].reshape(-1, hkv, d)[: seq[r]]
        kk = torch.cat([k_pool, uk]).float().repeat_interleave(g, 1)  # [L, Hq, D]
        vv = torch.cat([v_pool, uv]).float().repeat_interleave(g, 1)
        sc = torch.einsum("hd,lhd->hl", q[r].float(), kk) * scale
        ref = torch.einsum("hl,lhd->hd", torch.softmax(sc, -1), vv)
        assert rel_err(o[r], ref) < TOL[dtype]
        assert rel_err(lse[r], torch.logsumexp(sc, -1)) < 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_work_list_covers_every_tile_split_once(fused):
    hkv, g, bm = 3, 3, 16
    lens = [5, 300, 1, 128, 64, 700]
    offs = _offsets(lens)
    triples = [
        (c, h, r)
        for c in range(len(lens))
        for h in range(hkv)
        for r in range(20)
        if torch.rand(()) < 0.4
    ]
    sel = _selections(triples)
    work, meta, w_max = build_work_list(
        sel, offs, hkv, g, bm, 32, 10, 32, max_fused_groups=4096 if fused else 0
    )
    total, split_len = meta.tolist()
    assert 0 < total <= w_max and split_len % 32 == 0
    got = sorted(tuple(x) for x in work[:, :total].T.tolist())
    want = []
    keys = (sel.chunk * hkv + sel.kv_head).tolist()
    for k in sorted(set(keys)):
        start, n = keys.index(k), keys.count(k)
        ns = max(1, lens[k // hkv] // split_len)
        for tile in range(-(-n * g // bm)):
            want += [(start, n, tile, s, ns) for s in range(ns)]
    assert got == sorted(want)


# G = 1 (and 2, 4, 8) with TMA: every tuning-table tile is a TMA tile, and test_shapes.py runs
# each at D = 64, 128 on ragged chunks whose last one ends mid-block at the pool's end
@pytest.mark.parametrize("dtype,g", [(torch.float16, 4), (torch.float32, 3)])
def test_tma_path_matches_reference(dtype, g):
    """TMA loads: ragged chunks whose last block runs into the next chunk or past the pool's
    end (zero padding) must mask those keys; split-KV and multi-tile groups included."""
    b, hkv, d = 6, 2, 64
    lens = [1, 70, 200, 33, 45]  # the last chunk ends mid-block at the pool's end
    offs = _offsets(lens)
    s = int(offs[-1])
    q = torch.randn(b, hkv * g, d, dtype=dtype)
    k, v = torch.randn(s, hkv, d, dtype=dtype), torch.randn(s, hkv, d, dtype=dtype)
    triples = [
        (c, h, r)
        for c in range(len(lens))
        for h in range(hkv)
        for r in range(b)
        if (c * 7 + h * 3 + r) % 3 != 0
    ]
    _check(q, k, v, offs, _selections(triples), use_tma=True, **SMALL)


@pytest.mark.parametrize("merge_m,split_b", [(4, 2), (8, 8), (16, 4)])
def test_split_merge_shared_by_split_programs(merge_m, split_b):
    """Many splits of a few tiles: each tile's rows are merged in sub-blocks of merge_m rows
    by its split programs, split_b partials per step (ragged last step, some empty splits)."""
    b, hkv, g, d = 6, 1, 4, 32
    offs = _offsets([1000])
    q = torch.randn(b, hkv * g, d)
    k, v = torch.randn(1000, hkv, d), torch.randn(1000, hkv, d)
    sel = _selections([(0, 0, r) for r in range(b)])
    kw = {"block_m": 16, "block_n": 32, "target_programs": 40, "min_split": 32}
    work, _meta, _ = build_work_list(sel, offs, hkv, g, 16, 32, 40, 32)
    assert int(work[4, 0]) >= 16 // merge_m  # enough splits to share the merge
    _check(q, k, v, offs, sel, merge_m=merge_m, split_b=split_b, **kw)
    with pytest.raises(ValueError, match="split_b must be a power of two"):
        grouped_shared_attention(q, k, v, offs, sel, 1.0, split_b=3, **kw)


@pytest.mark.parametrize("programs,use_tma", [(1, False), (3, True)])
def test_capped_grid_loops_over_every_item(programs, use_tma):
    """max_programs: a grid smaller than the work list; each program loops over items
    (multi-tile groups and split items included) and every output row is still written."""
    b, hkv, g, d = 6, 2, 4, 64
    lens = [1, 70, 200, 33, 45]
    offs = _offsets(lens)
    s = int(offs[-1])
    q = torch.randn(b, hkv * g, d, dtype=torch.float16)
    k, v = torch.randn(s, hkv, d, dtype=torch.float16), torch.randn(s, hkv, d, dtype=torch.float16)
    triples = [
        (c, h, r)
        for c in range(len(lens))
        for h in range(hkv)
        for r in range(b)
        if (c * 5 + h + r) % 4 != 1
    ]
    sel = _selections(triples)
    _, meta, _ = build_work_list(sel, offs, hkv, g, 16, 32, 6, 32)
    assert int(meta[0]) > 3 * programs  # each program runs several items
    _check(q, k, v, offs, sel, max_programs=programs, use_tma=use_tma, **SMALL)
