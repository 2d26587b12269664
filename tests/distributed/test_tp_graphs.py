"""Tensor-parallel decode CUDA graphs and the one-message step header (tp_graphs.py,
step_channel.py).

On CPU (2 forked gloo ranks, one set for the file): the control message's protocol (a
FORWARD's payload rides in its header, an oversized one follows and the next message grows,
`logits_follow` replaces LOGITS_LAST, GRAPH_STEP's inputs arrive exactly, agree), and the
real engine on rank 0 with `serve_steps` on rank 1 with graphs forced on and the CUDA capture
faked (`tp_support.fake_capture`: the same static buffers, warm-up and bucket protocol; a replay runs the
recorded forward eagerly, collectives included, where CUDA would replay them): greedy tokens
equal one process's, both ranks replay the same buckets the same number of times, and a
decode step costs rank 1 one control message. Greedy decode steps gather each rank's argmax
(FOLLOW_TOKENS, `greedy_tokens`: ties to the lowest id across ranks, as argmax) instead of
the logits; a step with a logprobs request gathers the logits, and its tokens and logprobs
equal one process's. With 2 GPUs the real thing runs over NCCL (`test_tp_graphs_nccl`,
cuda-marked).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import run_ranks
from tp_support import build_checkpoint, engine_kwargs, fake_capture, greedy

from moska.distributed.control_message import MAX_CAPACITY, MIN_CAPACITY, next_capacity

pytestmark = pytest.mark.timeout(150)  # the ranks' run has its own 90 s deadline

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
MIXED = [[7, 3, 9, 12], [44, 45, 46]]  # with logprobs, plain greedy: one decode batch
TOKENS = 6  # greedy() gives request i TOKENS + i: the batch shrinks 3 -> 2 -> 1


_GRAPH_KW = {"attention": None, "scratch_block": 9, "block_size": 16, "max_blocks": 4,
             "max_batch": 8, "device": torch.device("cpu")}  # fmt: skip


def _forward_inputs(b: int, w: int, seed: int):
    from moska.attention.metadata import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata(
        slot_mapping=torch.randint(0, 1 << 20, (b,), generator=g),
        cu_q_lens=torch.arange(b + 1, dtype=torch.int32),
        seq_lens=torch.randint(1, 999, (b,), generator=g, dtype=torch.int32),
        block_tables=torch.randint(0, 999, (b, w), generator=g, dtype=torch.int32),
        decode_only=True,
    )
    return torch.randint(0, 1 << 17, (b,), generator=g), torch.randint(0, 999, (b,)), meta


def _protocol(rank: int, control, comm) -> dict:
    """Rank 0 sends a script of commands; rank 1 checks each and counts its broadcasts."""
    import torch.distributed as dist

    from moska.distributed.control_message import FOLLOW_TOKENS, Command
    from moska.distributed.step_channel import StepChannel

    ch = StepChannel(comm, control, torch.device("cpu"), 8, torch.float32)
    out_ties = _argmax_ties(rank, comm)
    calls, real = [0], dist.broadcast

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    dist.broadcast = counted  # type: ignore[assignment]
    script = [(2, 2, False), (64, 64, False), (64, 64, True), (3, 2, True)]  # (B, W, follow)
    out: dict = {"capacity": [], "broadcasts": [], "follow": [], "ties": out_ties}
    try:
        for i, (b, w, follow) in enumerate(script):
            ids, pos, meta = _forward_inputs(b, w, i)
            calls[0] = 0
            if rank == 0:
                ch.send_forward(ids, pos, SimpleNamespace(meta=meta), logits_follow=follow)
                if follow:
                    with pytest.raises(RuntimeError, match="logits_follow"):
                        ch.send_unload_library("x")  # refused before anything is sent
                ch.send_logits(ids, same_as_forward=True)  # LOGITS_LAST unless announced
            else:
                msg = ch.recv()
                assert msg.command is Command.FORWARD and msg.meta is not None
                assert torch.equal(msg.input_ids, ids) and torch.equal(msg.positions, pos)
                assert torch.equal(msg.meta.block_tables, meta.block_tables)
                assert torch.equal(msg.meta.seq_lens, meta.seq_lens)
                assert torch.equal(msg.meta.slot_mapping, meta.slot_mapping)
                out["broadcasts"].append(calls[0])
                out["follow"].append(msg.logits_follow)
                if not msg.logits_follow:
                    assert ch.recv().command is Command.LOGITS_LAST
            out["capacity"].append(ch.capacity)
        _, pos, meta = _forward_inputs(5, 3, 9)
        if rank == 0:
            args = (8, pos, meta.slot_mapping, meta.seq_lens, meta.block_tables)
            ch.send_graph_step(*args, FOLLOW_TOKENS)
            with pytest.raises(RuntimeError, match="logits_follow"):  # tokens were announced
                ch.send_logits(pos, same_as_forward=True)
            out["take"] = [ch.take_tokens(same_as_forward=s) for s in (False, True, True)]
            out["refused"] = ch.agree(None)
        else:
            msg = ch.recv()
            assert msg.command is Command.GRAPH_STEP and msg.bucket == 8
            assert msg.logits_follow == FOLLOW_TOKENS
            assert msg.meta is not None and torch.equal(msg.positions, pos)
            assert torch.equal(msg.meta.block_tables, meta.block_tables)
            assert torch.equal(msg.meta.seq_lens, meta.seq_lens)
            assert torch.equal(msg.meta.slot_mapping, meta.slot_mapping)
            out["refused"] = ch.agree("rank 1 says no")
    finally:
        dist.broadcast = real  # type: ignore[assignment]
    # a rank without graphs refuses a capture before any collective of it: no hang
    from moska.distributed.tp_graphs import TensorParallelGraphs
    from moska.distributed.worker import serve_steps
    from moska.engine.cuda_graphs import GraphCaptureError

    if rank == 0:
        model = SimpleNamespace(driver=ch, logits_follow=False)
        graphs = TensorParallelGraphs(model=model, **_GRAPH_KW)
        with pytest.raises(GraphCaptureError, match="rank 1: it runs eagerly") as e:
            graphs._get(2, None)
        out["capture_refused"] = str(e.value)
        ch.send_stop()
    else:
        serve_steps(None, None, ch, torch.device("cpu"), libraries=object(), graphs=None)
    return out


def _argmax_ties(rank: int, comm) -> dict:
    """greedy_tokens over 2 ranks' vocabulary shards (V = 37: 19 + 18) against the argmax of
    the full logits, on fresh random rows, three of them with tied maxima: across the ranks
    (ids 5 and 30), within rank 0 (7, 12) and within rank 1 (25, 33)."""
    from moska.distributed.tensor_parallel import TensorParallelCausalLM, span

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 16, generator=g)
    weight = torch.randn(37, 16, generator=g)
    for row, ids in enumerate([(5, 30), (7, 12), (25, 33)]):
        for i in ids:
            weight[i] = 4 * hidden[row]  # the largest logit of the row, twice
    lo, hi = span(37, 2, rank)
    shard = SimpleNamespace(driver=None, _last_hidden=None, lm_head_weight=weight[lo:hi],
                            plan=SimpleNamespace(vocab=(lo, hi)), comm=comm)  # fmt: skip
    got = TensorParallelCausalLM.greedy_tokens(shard, hidden)  # type: ignore[arg-type]
    want = (hidden @ weight.T).argmax(-1)
    return {"got": None if got is None else got.tolist(), "want": want.tolist()}


def _mixed(engine) -> dict:
    """MIXED decoded together: one request asks for logprobs (the logits are gathered)."""
    from moska.engine.sampling_params import SamplingParams

    for i, p in enumerate(MIXED):
        lp = 2 if i == 0 else None
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=lp)
        engine.add_request(f"m{i}", p, params)
    out: dict = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                c = o.outputs[0]
                out[o.request_id] = (c.token_ids, [t.logprob for t in c.logprobs or []])
    return out


def _count_heads(model) -> Counter:
    """Count the model's LM-head calls by kind (argmax gather or logits gather)."""
    heads: Counter = Counter()
    for name in ("greedy_tokens", "compute_logits"):
        real = getattr(model, name)
        setattr(model, name, lambda h, n=name, f=real: (heads.update([n]), f(h))[1])
    return heads


def _ranks(rank: int, world: int, path: str) -> dict:
    import torch.distributed as dist

    from moska.config import EngineConfig
    from moska.distributed.comm import Collectives
    from moska.distributed.step_channel import StepChannel
    from moska.distributed.tensor_parallel import TensorParallel
    from moska.distributed.worker import serve_steps
    from moska.engine.cuda_graphs import DecodeGraphs
    from moska.engine.llm_engine import LLMEngine
    from moska.engine.runner import ModelRunner
    from moska.model import load_model

    control = dist.new_group(backend="gloo")
    comm = Collectives(None, rank, world, "gloo")
    out = {"protocol": _protocol(rank, control, comm)}
    saved = ModelRunner._use_graphs, DecodeGraphs._capture
    ModelRunner._use_graphs = lambda self, kv_parallel: True  # type: ignore[method-assign]
    DecodeGraphs._capture = fake_capture  # type: ignore[method-assign]
    cpu = torch.device("cpu")
    kw = engine_kwargs("cpu", max_num_seqs=4)
    config = EngineConfig(model=path, **kw, tensor_parallel_size=world)
    loaded = load_model(path, dtype="float32", tensor_parallel=TensorParallel(comm))
    channel = StepChannel(comm, control, cpu, 64, torch.float32)
    if rank:
        runner = ModelRunner(loaded, config, cpu)
        commands: list = []
        recv = channel.recv

        def logged():
            msg = recv()
            commands.append(msg.command.name)
            return msg

        channel.recv = logged  # type: ignore[method-assign]
        heads = _count_heads(loaded.model)
        serve_steps(loaded.model, runner.attention, channel, cpu, graphs=runner.graphs)
        g = runner.graphs
        return {**out, "commands": commands, "replays": g.replays, "graphs": sorted(g._graphs),
                "heads": dict(heads)}  # fmt: skip
    loaded.model.driver = channel
    heads = _count_heads(loaded.model)
    try:
        eng = LLMEngine(config, loaded)
        out["tokens"] = greedy(eng, PROMPTS, TOKENS)
        g = eng.runner.graphs
        out.update(replays=g.replays, graphs=sorted(g._graphs), kind=type(g).__name__)
        out["heads_greedy"] = dict(heads)
        out["mixed"] = _mixed(eng)
        out.update(heads=dict(heads), replays_all=g.replays)
    finally:
        channel.send_stop()
    ModelRunner._use_graphs, DecodeGraphs._capture = saved  # type: ignore[method-assign]
    ref = LLMEngine.from_model(path, **kw)  # one process, eager
    assert ref.runner.graphs is None
    out["ref"] = greedy(ref, PROMPTS, TOKENS)
    out["mixed_ref"] = _mixed(ref)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("tpg") / "m")
    return run_ranks(_ranks, 2, str(path), timeout_s=90)


def test_capacity_policy():
    assert next_capacity(0) == MIN_CAPACITY
    assert next_capacity(192) == 256 and next_capacity(193) == 512  # 16 + 1.25n, a power of 2
    assert next_capacity(10**7) == MAX_CAPACITY


def test_peer_checks_its_bucket():
    from moska.distributed.tp_graphs import TensorParallelGraphs

    g = TensorParallelGraphs(model=SimpleNamespace(driver=None), **_GRAPH_KW)
    assert g.buckets == [1, 2, 4, 8]
    assert g.can_capture(4) is None and "bucket 3" in (g.can_capture(3) or "")
    pos = torch.arange(3)
    with pytest.raises(RuntimeError, match="has not captured"):  # never replays blind
        g.replay_for_peer(4, pos, pos, pos.int(), torch.zeros(3, 2, dtype=torch.int32))


def test_one_message_per_step(results):
    p0, p1 = results[0]["protocol"], results[1]["protocol"]
    # B = 2: inline (1); B = 64 x 64 blocks (4,417 int64) exceeds 256: header + follows (2),
    # the next message grows to hold 1.25x it, so the same size is inline again (1)
    assert p1["broadcasts"] == [1, 2, 1, 1]
    assert p1["capacity"] == p0["capacity"] == [MIN_CAPACITY, 8192, 8192, MIN_CAPACITY]
    assert p1["follow"] == [False, False, True, True]
    assert p0["take"] == [False, True, False]  # only the announced rows, once
    assert p0["refused"] == p1["refused"] == {1: "rank 1 says no"}
    assert "decode batch 2" in p0["capture_refused"]


def test_graph_steps_match_one_process(results):
    r0, r1 = results[0], results[1]
    assert r0["kind"] == "TensorParallelGraphs"
    assert r0["tokens"] == r0["ref"] and len(r0["tokens"]) == len(PROMPTS)
    # batches of 3, 2, 1 rows: buckets 4, 2, 1, captured by both ranks alike
    assert r0["graphs"] == r1["graphs"] == [(1,), (2,), (4,)]
    assert r0["replays_all"] == r1["replays"] > r0["replays"] >= TOKENS  # MIXED's replayed
    c = Counter(r1["commands"])
    assert c["GRAPH_CAPTURE"] == 3 and c["GRAPH_STEP"] == r1["replays"]
    # a decode step is one message: no LOGITS_LAST (every step said logits_follow)
    assert set(c) <= {"FORWARD", "LOGITS_ROWS", "GRAPH_CAPTURE", "GRAPH_STEP", "STOP"}


def test_argmax_only_is_plain_greedy():
    from moska.engine.sampler import Sampler
    from moska.engine.sampling_params import SamplingParams as P

    g = P(temperature=0.0)
    assert Sampler.argmax_only([g, g])
    others = [P(temperature=0.7), P(temperature=0.0, logprobs=1),
              P(temperature=0.0, logit_bias=((3, 1.0),)), P(temperature=0.0, repetition_penalty=1.2),
              P(temperature=0.0, logits_processors=(lambda ids, x: x,))]  # fmt: skip
    assert not any(Sampler.argmax_only([g, o]) for o in others)


def test_argmax_gather_equals_full_argmax_with_ties(results):
    t0, t1 = results[0]["protocol"]["ties"], results[1]["protocol"]["ties"]
    assert t0["got"] == t0["want"] and t1["got"] is None
    assert t0["want"][:3] == [5, 7, 25]  # the first of each tie, as argmax of the logits


def test_greedy_steps_gather_tokens_logprobs_steps_logits(results):
    r0, r1 = results[0], results[1]
    # every greedy decode step (each a graph replay) took the argmax gather, on both ranks;
    # the logits were gathered for the prefills' rows only
    h = r0["heads_greedy"]
    assert h["greedy_tokens"] == r0["replays"] and h["compute_logits"] == 1
    # the MIXED steps (a logprobs request in each) gathered the logits, both ranks alike
    assert r0["heads"]["greedy_tokens"] == h["greedy_tokens"] == r1["heads"]["greedy_tokens"]
    assert r0["heads"]["compute_logits"] >= h["compute_logits"] + 4 == 5
    assert r1["heads"]["compute_logits"] == r0["heads"]["compute_logits"]
    got, want = r0["mixed"], r0["mixed_ref"]
    assert set(got) == set(want) == {"m0", "m1"}
    for rid in got:
        assert got[rid][0] == want[rid][0]  # tokens
        lp, ref = torch.tensor(got[rid][1]), torch.tensor(want[rid][1])
        assert lp.shape == ref.shape and (rid == "m1" or lp.numel() == 4)
        if lp.numel():
            assert ((lp - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start", ["spawn", "forkserver"])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_tp_graphs_nccl(tmp_path, monkeypatch, start):
    """2 GPUs, NCCL, the engine's workers: decode steps replay CUDA graphs on both ranks
    and greedy tokens equal one GPU's eager engine. Workers spawned (as `moska serve`) and
    forked from the tests' forkserver (tests/distributed/conftest.py). Short timeouts: a
    rank that stops answering fails the test in seconds (RankFailedError), and a worker
    still inside one command after 30 s writes its stacks to stderr."""
    import multiprocessing

    from moska.distributed.rank_processes import use_process_context
    from moska.engine.llm_engine import LLMEngine

    # opt-in until measured; the workers take rank 0's MOSKA_* settings (Rendezvous.env)
    monkeypatch.setenv("MOSKA_TP_CUDA_GRAPHS", "1")
    monkeypatch.setenv("MOSKA_DIST_TIMEOUT_S", "40")
    monkeypatch.setenv("MOSKA_DIST_CONTROL_TIMEOUT_S", "25")
    monkeypatch.setenv("MOSKA_DIST_STUCK_DUMP_S", "30")
    path = build_checkpoint(tmp_path / "m")
    kw = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 4,
          "enable_prefix_caching": False}  # fmt: skip
    ref = LLMEngine.from_model(str(path), **kw, enforce_eager=True)
    want = greedy(ref, PROMPTS, TOKENS)
    seam = contextlib.nullcontext()  # the conftest's forkserver
    if start == "spawn":
        seam = use_process_context(lambda: multiprocessing.get_context("spawn"))
    with seam:
        eng = LLMEngine.from_model(str(path), **kw, tensor_parallel_size=2)
    try:
        assert eng.capture_graphs(progress=False) == 3  # buckets 1, 2, 4 on both ranks
        assert greedy(eng, PROMPTS, TOKENS) == want
        g = eng.runner.graphs
        assert type(g).__name__ == "TensorParallelGraphs" and g.replays >= TOKENS
    finally:
        t0 = time.monotonic()
        eng.shutdown()
    # NCCL's destroy waits for its peers' and for captured graphs: it hung here (session 15)
    assert eng.dist.teardown == "destroyed", eng.dist.teardown
    assert time.monotonic() - t0 < 20
