"""The blend computes a planned prompt's last token too (`finish`, `SemShareConfig.
finish_in_blend`), so the engine samples the first token without a forward of its own.

Blend level (built-in tiny model, CPU, fp32, rows unbucketed as on the CPU): blending
[start, N) with `finish` returns the hidden state that the old way (blend [start, N - 1),
then a plain forward of the last token over that cache) computes, and leaves the same KV,
through the eager tail and through the graphs' buffers, also when the last token is matched
in the plan (it is computed anyway). With row buckets (CUDA) the rows selected are the same
(unmatched + the most deviating fraction) and the last token takes one padding row's place.
CUDA (`-m cuda`): a captured replay's finish (the last row read from the graph's buffers)
gives the eager tail's hidden state and KV. Engine level: the step of a planned prompt's
last token runs no forward (the runner samples from the blend's hidden state) and gives the
tokens and logprobs that the forward gives; its blocks never enter the prefix cache (its KV
is private: `Request.private_kv`), though it reads other prompts' exact blocks there."""

import dataclasses

import pytest
import torch
from test_graphs import _CUDA, BLOCKS, _cache, _kv, _rel, _setup

from moska import LLM, SamplingParams
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.graphs import BlendGraphs
from moska.semshare.reuse import row_buckets


@pytest.mark.parametrize("start", [0, 48])
@pytest.mark.parametrize("buffered", [False, True])
def test_finish_equals_a_forward_of_the_last_token(blend_cpu, start, buffered):
    model, _, ref, ids, ref_pos = blend_cpu
    ref_pos = ref_pos.clone()
    assert int(ref_pos[-1]) >= 0  # the last token is matched: finish computes it anyway
    n = ids.shape[0]
    table = list(range(20, BLOCKS))
    old, new = _cache(model, torch.float32, "cpu"), _cache(model, torch.float32, "cpu")
    graphs = None
    if buffered:
        graphs = BlendGraphs(model, new, 1, 256, row_buckets(256, 16), capture=False)
    with torch.inference_mode():
        for c in (old, new):
            if start:
                extend(model, c, table, ids[:start], 0)
        args = (ref, ref_pos[start : n - 1], 0.1, 1)
        want_res = blend_prefill(model, old, table, ids[start : n - 1], start, *args)
        want = extend(model, old, table, ids[n - 1 :], n - 1)  # the forward of the last token
        got_res = blend_prefill(
            model, new, table, ids[start:], start, ref, ref_pos[start:], 0.1, 1,
            graphs=graphs, finish=True,
        )  # fmt: skip
    assert ref_pos[-1] >= 0  # the caller's plan is left as it was
    assert got_res.hidden is not None and got_res.hidden.shape == (1, model.config.hidden_size)
    assert want_res.hidden is None
    assert _rel(got_res.hidden.double(), want.double()) < 1e-4
    assert got_res.num_reused == want_res.num_reused > 0
    if buffered:
        assert graphs.eager == 1  # the buffers' tail ran (and its last row came from them)
    for a, b in zip(_kv(new, n), _kv(old, n), strict=True):
        assert _rel(a, b) < 1e-5


def test_no_finish_when_the_first_layers_are_all(blend_cpu):
    model, _, ref, ids, ref_pos = blend_cpu
    layers = len(model.layers)
    cache = _cache(model, torch.float32, "cpu")
    with torch.inference_mode():
        res = blend_prefill(
            model, cache, list(range(20, BLOCKS)), ids, 0, ref, ref_pos, 0.1, layers, finish=True
        )
    assert res.hidden is None and res.num_reused == 0  # the engine's forward computes it


PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def llm():
    return LLM(
        None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=64,
        max_model_len=512, semantic_reuse=True,
    )  # fmt: skip


def _prompts(blend_cpu):
    a = blend_cpu[3][:-8].tolist()
    return a, a[:40] + [7, 8, 9] + a[40:]  # an insertion: the rest shifts by 3


def test_engine_samples_from_the_blend(blend_cpu, llm):
    engine = llm.engine
    reuse, runner = engine.semshare, engine.runner
    forwards, shortcuts = [], []
    model_call, blended = runner.model.forward, runner._blended

    def count_forward(*a, **k):
        forwards.append(a[0].shape[0])
        return model_call(*a, **k)

    def count_blended(*a, **k):
        out = blended(*a, **k)
        shortcuts.append(out is not None)
        return out

    runner.model.forward = count_forward
    runner._blended = count_blended
    a, b = _prompts(blend_cpu)
    llm.generate([a], PARAMS)  # stored as the reference
    outs = {}
    for finish in (False, True):
        reuse.config = dataclasses.replace(reuse.config, finish_in_blend=finish)
        forwards.clear(), shortcuts.clear()
        outs[finish] = llm.generate([b], PARAMS)[0]
        assert outs[finish].num_reused_tokens > 0
        # the prompt step (the blend's) and 3 decode steps; with finish, no forward for it
        assert shortcuts[0] is finish and not any(shortcuts[1:])
        assert forwards == [1] * (3 if finish else 4)
    old, new = outs[False].outputs[0], outs[True].outputs[0]
    assert new.token_ids == old.token_ids
    for lp_new, lp_old in zip(new.logprobs, old.logprobs, strict=True):
        assert lp_new.top.keys() == lp_old.top.keys()
        for t, v in lp_old.top.items():
            assert abs(lp_new.top[t] - v) <= 1e-4 * max(1.0, abs(v))
    runner.model.forward, runner._blended = model_call, blended
    engine.block_manager.check_integrity()


def test_planned_prompt_reads_exact_blocks_registers_none(blend_cpu, llm):
    """A planned prompt's approximate KV is private: none of its blocks is registered in the
    prefix cache (an unplanned prompt's are), while its leading blocks may be other prompts'
    exact KV: the blend then starts after them."""
    engine = llm.engine
    bm, reuse = engine.block_manager, engine.semshare
    cache = bm.prefix_cache
    registered = []
    insert = cache.insert

    def count(*a, **k):
        registered.append(a[0])
        return insert(*a, **k)

    cache.insert = count
    try:
        a, _ = _prompts(blend_cpu)
        llm.generate([a], PARAMS)  # stored (or already): computed in full, registered
        assert len(cache) >= len(a) // bm.block_size
        b = a[:64] + [7, 8, 9] + a[64:]  # its first 4 blocks are a's
        registered.clear()
        blended = reuse.stats.blended_tokens
        out = llm.generate([b], PARAMS)[0]
        assert out.num_reused_tokens > 0 and out.num_cached_tokens == 64
        assert reuse.stats.blended_tokens - blended == len(b) - 64  # from the cached prefix on
        assert registered == []  # nothing of b (the decode blocks neither)
        plain = [(t * 7 + 3) % 256 for t in a]  # unlike any stored prompt: not planned
        assert llm.generate([plain], PARAMS)[0].num_reused_tokens == 0
        assert len(registered) >= len(plain) // bm.block_size
    finally:
        cache.insert = insert
    bm.check_integrity()


@_CUDA
def test_cuda_replay_finish_equals_eager():
    model, _, ref, ids, ref_pos = _setup("cuda", torch.float16)
    n = ids.shape[0]
    table = list(range(20, BLOCKS))
    eager_cache, cache = _cache(model, torch.float16, "cuda"), _cache(model, torch.float16, "cuda")
    graphs = BlendGraphs(model, cache, 1, 256, row_buckets(256, 16))
    with torch.inference_mode():
        graphs.warm_up()
        res = [
            blend_prefill(
                model, c, table, ids, 0, ref, ref_pos, 0.1, 1, granule=16, graphs=g, finish=True
            )
            for c, g in ((eager_cache, None), (cache, graphs))
        ]
    assert graphs.replays == 1 and graphs.eager == 0
    assert res[0].num_reused == res[1].num_reused > 0
    assert _rel(res[1].hidden.double(), res[0].hidden.double()) < 1e-2
    for a, b in zip(_kv(cache, n), _kv(eager_cache, n), strict=True):
        assert _rel(a, b) < 1e-2
