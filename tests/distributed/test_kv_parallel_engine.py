"""Decode context parallelism in the engine (decode_context_parallel_size=2, gloo, the tiny
Llama): requests' KV blocks are sharded over two processes; a request longer than one
rank's KV cache is served, and its fp32 logits and greedy tokens equal a one-process
engine's with enough blocks. Without processes: each rank's part of a step
(`local_step`), attended and merged, equals plain paged attention on random inputs."""

from __future__ import annotations

import pytest
import torch
from tp_support import build_checkpoint, engine_kwargs, greedy, prefill_logits, rel_err

from moska.attention.metadata import AttentionMetadata
from moska.distributed.kv_parallel import merge_partials
from moska.distributed.kv_parallel_step import KVParallelConfigError, local_step
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams
from moska.engine.scheduler import RequestTooLarge
from moska.kernel_ops import kernel_ops

pytestmark = pytest.mark.timeout(60)  # a hang fails

BLOCK = 16
LOCAL_BLOCKS = 4  # per rank: 64 tokens; the long prompt needs 6 blocks, 7 with its output
LONG = [int(t) for t in torch.randint(3, 256, (90,), generator=torch.Generator().manual_seed(5))]
SHORT = [7, 8, 9, 10, 11]


def test_shards_attended_and_merged_equal_paged_attention():
    """P = 3 ranks simulated in one process: every rank writes its rows, attends its
    blocks; the LSE merge equals attention over one cache (a prefill chunk and a decode
    row in one step, global blocks in a scrambled order)."""
    g = torch.Generator().manual_seed(0)
    ops = kernel_ops("torch", torch.device("cpu"))
    p, hq, hkv, d, n_global = 3, 4, 2, 8, 12
    seq_lens, q_lens = [40, 23], [7, 1]  # request 0: a 7-token chunk; request 1: decode
    perm = torch.randperm(n_global, generator=g)
    tables = torch.stack([perm[:6], torch.cat([perm[6:8], perm[:4] * 0])])  # [2, 6]
    slots, cu = [], [0]
    for b, (s, q) in enumerate(zip(seq_lens, q_lens)):
        slots += [int(tables[b, i // BLOCK]) * BLOCK + i % BLOCK for i in range(s - q, s)]
        cu.append(cu[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        cu_q_lens=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables.int(),
        decode_only=False,
    )
    k_all = torch.randn(n_global, BLOCK, hkv, d, generator=g)  # the whole KV, one cache
    v_all = torch.randn(n_global, BLOCK, hkv, d, generator=g)
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    want, _ = ops.paged_prefill(
        q, k_all, v_all, meta.block_tables, meta.cu_q_lens, meta.seq_lens, 0.3
    )
    o_parts, lse_parts = [], []
    for r in range(p):
        kc = torch.zeros(n_global // p, BLOCK, hkv, d)
        vc = torch.zeros_like(kc)
        for gb in range(r, n_global, p):  # the rank's blocks at their local ids
            kc[gb // p], vc[gb // p] = k_all[gb], v_all[gb]
        step = local_step(meta, r, p, BLOCK)
        assert all(int(s) // BLOCK % p == r for s in meta.slot_mapping[step.write_rows])
        o, lse = ops.paged_decode(q, kc, vc, step.block_tables, step.visible, 0.3)
        o_parts.append(o)
        lse_parts.append(lse)
    got, _ = merge_partials(torch.stack(o_parts), torch.stack(lse_parts))
    assert rel_err(got, want) < 1e-5
    assert sum(len(local_step(meta, r, p, BLOCK).write_rows) for r in range(p)) == len(slots)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("kvp") / "m", seed=4)
    # a step takes 48 tokens: the long prompt is prefilled in two chunks
    kw = engine_kwargs("cpu", max_num_batched_tokens=48, max_num_seqs=8)
    ref = LLMEngine.from_model(str(path), **kw)  # 64 blocks: enough for everything
    small = {**kw, "num_kv_blocks": LOCAL_BLOCKS}
    one = LLMEngine.from_model(str(path), **small)
    eng = LLMEngine.from_model(str(path), **small, decode_context_parallel_size=2)
    try:
        yield ref, one, eng
    finally:
        eng.shutdown()


def test_long_request_greedy_tokens_equal_one_process(engines):
    ref, one, eng = engines
    assert eng.runner.num_blocks == 2 * LOCAL_BLOCKS and eng.runner.cache.k.shape[1] == 4
    with pytest.raises(RequestTooLarge):  # one rank's cache cannot hold it
        greedy(one, [LONG], 20)
    gathers = eng.runner.attention.gathers
    want = greedy(ref, [LONG, SHORT], 20)
    got = greedy(eng, [LONG, SHORT], 20)
    assert got == want and len(got["g0"]) == 20 and len(got["g1"]) == 21
    assert eng.runner.attention.gathers > gathers  # the layers went through the merge


def test_long_request_logits_equal_one_process(engines):
    ref, _, eng = engines
    prompts = [LONG[:70], SHORT]  # 5 + 1 blocks: rank 0 holds 0, 2, 4; rank 1 holds 1, 3, 5
    want = prefill_logits(ref, prompts)
    got = prefill_logits(eng, prompts)
    assert got.shape == want.shape == (75, 256)
    assert rel_err(got, want) < 1e-4


def test_a_library_build_runs_on_rank_0(engines, tmp_path):
    """A build's prefill is no engine step: rank 0 (the whole model) runs it alone, and its
    KV is a one-process build's."""
    ref, _, eng = engines
    docs = [("a.txt", LONG[:40]), ("b.txt", LONG[40:])]
    calls = eng.runner.attention.gathers
    for e in (ref, eng):
        e.libraries.progress = False
        e.libraries.root = tmp_path / ("ref" if e is ref else "kvp")
        e.libraries.build("docs", docs, chunk_size=BLOCK)
    want, got = ref.libraries.get("docs"), eng.libraries.get("docs")
    assert got.num_chunks == want.num_chunks == 6
    for layer in range(2):
        assert rel_err(got.k_pools[layer], want.k_pools[layer]) < 1e-5
    assert eng.runner.attention.gathers == calls  # no step went to rank 1


def test_what_it_does_not_serve_is_refused(engines, tmp_path):
    _, _, eng = engines
    with pytest.raises(KVParallelConfigError, match="decode_context_parallel_size=1"):
        eng.add_request("lib", [5, 6], SamplingParams(max_tokens=2), library="any")
    assert not eng.has_unfinished_requests()
    with pytest.raises(KVParallelConfigError, match="tensor_parallel_size"):  # nothing started
        LLMEngine.from_model(str(tmp_path), decode_context_parallel_size=2, tensor_parallel_size=2)
