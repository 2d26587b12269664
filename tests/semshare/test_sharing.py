"""SemShareKV's shared blocks (`moska/semshare/sharing.py`; built-in tiny model, CPU, fp32):
a request that reuses a reference takes the reference's blocks whose KV it would copy
unchanged instead of fresh ones, and generates what copying generates (greedy tokens,
logprobs within 1e-4); a reference evicted from the store while a request still shares (or
is about to copy from) its blocks frees none of them (ref counts), one freed before the
request's first allocation leaves it computed in full (exact); abort and preemption
release the pins and blocks; references give blocks back under pool pressure."""

import dataclasses
import random

import pytest

from moska import LLM, SamplingParams
from moska.model.reference import greedy_generate

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
BS = 16


@pytest.fixture(scope="module")
def llm():
    # a 100-token prompt is computed in 4 steps (chunked prefill): events between them
    return LLM(
        None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=26,
        max_model_len=512, semantic_reuse=True, max_num_batched_tokens=32, max_num_seqs=4,
    )  # fmt: skip


def _prompts(seed: int):
    rng = random.Random(seed)
    a = [rng.randrange(0, 256) for _ in range(100)]
    b = list(a)
    b[3] = (b[3] + 1) % 256  # no exact prefix; blocks 1-2 and 4-5 stay equal at shift 0
    b[50] = (b[50] + 7) % 256
    return a, b


def _run(llm, prompt, rid, between=None):
    """Generate one request step by step; `between(step, request)` after each step."""
    engine = llm.engine
    engine.add_request(rid, prompt, PARAMS)
    req = engine.scheduler._requests[rid]
    out, step = None, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        step += 1
        if between is not None and not req.is_finished:
            between(step, req)
    return out, req


def _same(x, y):
    assert x.outputs[0].token_ids == y.outputs[0].token_ids
    for p, q in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
        assert p.top.keys() == q.top.keys()
        for t, v in q.top.items():
            assert abs(p.top[t] - v) <= 1e-4 * max(1.0, abs(v))


def _share(llm, on: bool):
    reuse = llm.engine.semshare
    reuse.config = dataclasses.replace(reuse.config, share_blocks=on)


def _stored(llm, a, rid):
    reuse = llm.engine.semshare
    _run(llm, a, rid)
    ref = next(r for r in reuse.store.lru_entries() if r.token_ids.tolist() == a)
    assert ref.blocks is not None and not ref.blocks.freed  # blocks of the cache, held
    return ref


def test_shared_equals_copied_and_holds_less(llm):
    engine = llm.engine
    a, b = _prompts(1)
    ref = _stored(llm, a, "s-a")
    table = {}
    _share(llm, True)
    shared, req = _run(llm, b, "s-b1", lambda s, r: table.setdefault(s, list(
        engine.block_manager.block_table(r.request_id))))  # fmt: skip
    plan = req.semantic
    # expected independently: full blocks before the last token's, each token equal to the
    # reference's and matched at its own position
    want = [
        i for i in range((len(b) - 1) // BS)
        if all(b[p] == a[p] and int(plan.ref_pos[p]) == p for p in range(i * BS, i * BS + BS))
    ]  # fmt: skip
    assert want and sorted(plan.shared) == want
    # taken: those not the last block of a step's allocation (a step's last token is
    # computed by the forward, which writes its KV): steps of 32 tokens end in 1, 3, 5, 6
    ends = {(min(s + 32, len(b)) - 1) // BS for s in range(0, len(b), 32)}
    taken = [i for i in want if i not in ends]
    held = table[max(table)]  # its table once the prompt is computed
    assert taken and [held[i] for i in taken] == [ref.blocks.table[i] for i in taken]
    assert all(held[i] not in ref.blocks.table for i in range(len(held)) if i not in taken)
    assert req.num_shared_blocks == len(taken) and shared.num_reused_tokens > 0
    _share(llm, False)
    copied, req2 = _run(llm, b, "s-b2")
    assert req2.num_shared_blocks == 0 and copied.num_reused_tokens == shared.num_reused_tokens
    _same(shared, copied)
    _share(llm, True)
    engine.block_manager.check_integrity()
    assert ref.blocks.pins == 0 and not ref.blocks.freed


def test_evicted_reference_keeps_shared_and_pinned_blocks(llm):
    engine, reuse = llm.engine, llm.engine.semshare
    bm = engine.block_manager
    a, b = _prompts(2)
    ref = _stored(llm, a, "e-a")
    base, _ = _run(llm, b, "e-b0")
    counts = {}

    def evict(step, req):
        if step == 1:  # blended its first range, pinned for the rest: evicted from the store
            assert ref.blocks.pins == 1 and req.semantic.pinned == req.request_id
            reuse.store.evict(ref.key)
            assert not ref.blocks.freed  # pinned: the blend still copies from its blocks
        if req.num_computed_tokens >= len(b) and not counts:  # prompt done: pin dropped
            assert ref.blocks.freed and ref.blocks.pins == 0
            table = bm.block_table(req.request_id)
            taken = [i for i, blk in req.semantic.shared.items() if table[i] == blk]
            counts.update({i: bm.allocator.ref_count(table[i]) for i in taken})
            bm.check_integrity()

    got, req = _run(llm, b, "e-b1", evict)
    _same(got, base)
    assert counts and all(c == 1 for c in counts.values())  # the request's own count only
    assert req.num_shared_blocks == len(counts) > 0
    bm.check_integrity()


def test_reference_freed_before_allocation_computes_in_full(llm):
    engine, reuse = llm.engine, llm.engine.semshare
    a, b = _prompts(4)
    ref = _stored(llm, a, "f-a")
    engine.add_request("f-b", b, PARAMS)  # planned on `ref` at intake
    req = engine.scheduler._requests["f-b"]
    assert req.semantic is not None and req.semantic.ref is ref
    reuse.store.evict(ref.key)  # not pinned yet: its blocks go at once
    assert ref.blocks.freed
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    want = greedy_generate(engine.loaded.model, b, PARAMS.max_tokens)
    assert out.outputs[0].token_ids == want and out.num_reused_tokens == 0
    assert req.semantic.pinned is None and getattr(req, "num_shared_blocks", 0) == 0
    engine.block_manager.check_integrity()


def test_abort_and_preemption_release(llm):
    engine, reuse = llm.engine, llm.engine.semshare
    bm, sched = engine.block_manager, engine.scheduler
    a, b = _prompts(3)
    ref = _stored(llm, a, "p-a")
    base, _ = _run(llm, b, "p-b0")
    before = {blk: bm.allocator.ref_count(blk) for blk in ref.blocks.table}
    preempted = []

    def preempt(step, req):
        if step == 1:  # mid-prompt: blocks freed, pin dropped; it starts over, pinned again
            assert ref.blocks.pins == 1
            sched._running.remove(req)  # as the scheduler does before `_preempt`
            sched._preempt(req)
            preempted.append(req.semantic.pinned)
            assert ref.blocks.pins == 0 and not bm.block_table(req.request_id)
            assert {blk: bm.allocator.ref_count(blk) for blk in ref.blocks.table} == before

    got, req = _run(llm, b, "p-b1", preempt)
    assert preempted == [None]
    _same(got, base)
    assert req.num_shared_blocks > 0  # shared again after the recompute

    def abort(step, req):
        if step == 1:
            engine.abort_request(req.request_id)

    _run(llm, b, "p-b2", abort)
    assert ref.blocks.pins == 0 and not reuse.blocks._pins
    assert {blk: bm.allocator.ref_count(blk) for blk in ref.blocks.table} == before
    bm.check_integrity()


def test_references_give_blocks_back_under_pressure(llm):
    engine, reuse = llm.engine, llm.engine.semshare
    bm = engine.block_manager
    for i in range(3):  # references of other prompts, then one that needs their blocks
        _stored(llm, _prompts(10 + i)[0], f"r-{i}")
    free = bm.num_free_blocks
    evicted = reuse.store.stats.evictions
    rng = random.Random(7)
    big = [rng.randrange(0, 256) for _ in range((free + 4) * BS)]
    out, _ = _run(llm, big, "r-big")  # computed in full: references evicted, no hang
    assert len(out.outputs[0].token_ids) == PARAMS.max_tokens
    assert reuse.store.stats.evictions > evicted
    assert all(not r.blocks.freed for r in reuse.store.lru_entries())
    bm.check_integrity()


def test_matching_ties_go_to_the_same_position():
    """An equal token in an equal context earlier in the reference (a repeated line) scores
    the same as the one at the prompt token's own position: the match is the latter, so
    runs of unchanged tokens keep their positions (and their blocks can be shared)."""
    import torch

    from moska.semshare.matching import match_tokens

    gen = torch.Generator().manual_seed(3)
    ref = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    ref[30] = ref[5]  # a repeated (token, context)
    ref[31] = ref[6]
    new = ref.clone()
    new[10] = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=-1)
    pos = match_tokens(new, ref, 0.9).ref_pos
    assert pos[30] == 30 and pos[31] == 31 and pos[5] == 5 and pos[6] == 6
    assert pos[10] == -1
    assert (pos[[i for i in range(40) if i != 10]] == torch.tensor([
        i for i in range(40) if i != 10])).all()  # fmt: skip
    shorter = match_tokens(new[:35], ref[:20], 0.9).ref_pos  # beyond the reference: max's pick
    assert shorter[30] == 5 and shorter[31] == 6


def test_bucket_filled_by_a_repeated_row_is_exact(blend_cpu):
    """When the rows that may be kept past the boundary are too few to fill a row bucket
    (most of the prompt in shareable blocks), the first kept row is repeated: the same KV
    and hidden state as the unpadded blend, and the row count is the bucket's."""
    import torch
    from test_graphs import BLOCKS, _cache, _kv, _rel

    from moska.semshare import blend as blend_mod
    from moska.semshare.blend import blend_prefill, row_bucket

    model, _, ref, ids, ref_pos = blend_cpu
    n = ids.shape[0]
    fixed = ref_pos >= 0  # every matched row out of the candidates: the bucket cannot fill
    fixed[-1] = False
    table = list(range(20, BLOCKS))
    seen = []
    select = blend_mod._select

    def spy(*a, **k):
        rows, kept = select(*a, **k)
        seen.append(rows.tolist())
        return rows, kept

    blend_mod._select = spy
    try:
        out = {}
        for granule in (1, 64):
            cache = _cache(model, torch.float32, "cpu")
            with torch.inference_mode():
                res = blend_prefill(
                    model, cache, table, ids, 0, ref, ref_pos, 0.0, 1, granule=granule,
                    finish=True, fixed=fixed,
                )  # fmt: skip
            out[granule] = (res, _kv(cache, n))
    finally:
        blend_mod._select = select
    plain, padded = seen
    assert len(padded) == row_bucket(len(plain), n, 64) > len(plain)
    assert sorted(set(padded)) == plain and padded[-1] == plain[-1]
    (a, kv_a), (b, kv_b) = out[1], out[64]
    assert a.num_recomputed == b.num_recomputed == len(plain) and a.num_reused == b.num_reused
    assert _rel(b.hidden.double(), a.hidden.double()) < 1e-5
    for x, y in zip(kv_b, kv_a, strict=True):
        assert _rel(x, y) < 1e-5
