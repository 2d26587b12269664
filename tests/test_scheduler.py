"""Scheduler: one token budget, chunked prefill, FIFO admission, preemption, stop rules."""

import random
import zlib
from typing import NamedTuple

import pytest

from moska.cache import BlockManager
from moska.engine.request import Request, RequestStatus
from moska.engine.sampling_params import SamplingParams
from moska.engine.scheduler import RequestTooLarge, Scheduler, SchedulerOutput
from moska.engine.scheduler_config import SchedulerConfig

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=16, chunked=True):
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked
    )
    return Scheduler(config, BlockManager(num_blocks, block_size))


def make_request(rid, prompt, library=None, eos=None, **params):
    params.setdefault("max_tokens", 4)
    if isinstance(prompt, int):
        # zlib.crc32, not hash(): str hashes change per process, and two ids whose prompts
        # happened to share a first block would hit the prefix cache in some runs only.
        prompt = [(zlib.crc32(rid.encode()) + i) % 50 + 10 for i in range(prompt)]
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(**params),
        eos_token_id=eos,
        library=Lib(library, f"{library}-b1") if isinstance(library, str) else library,
    )


class Lib(NamedTuple):
    name: str
    build_id: str
    position_offset: int = 0


def fake_token(req: Request) -> int:
    """Deterministic in the token sequence only, never EOS (>= 100)."""
    return 100 + (sum(req.all_token_ids) * 31 + req.num_tokens) % 97


def step(sched: Scheduler, token_fn=fake_token) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    cfg = sched.config
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        r = s.request
        assert r.status is RequestStatus.RUNNING and s.num_new_tokens > 0
        assert len(
            sched.block_manager.block_table(r.request_id)
        ) * sched.block_manager.block_size >= (r.num_computed_tokens + s.num_new_tokens)
    sampled = {s.request.request_id: token_fn(s.request) for s in out.scheduled if s.samples}
    got = sched.update_from_output(out, sampled)
    sched.block_manager.check_integrity()
    return out, got


def run_to_end(sched, token_fn=fake_token, max_steps=10_000):
    steps = []
    while sched.has_unfinished:
        steps.append(step(sched, token_fn)[0])
        assert len(steps) < max_steps
    sched.schedule()  # idle: checks integrity and that no block is held
    return steps


def new_tokens(out):
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=16)


def test_chunked_prefill_then_decode():
    sched = make_scheduler(budget=32)
    req = make_request("a", 100, max_tokens=3)
    sched.add_request(req)
    assert sched.waiting_prefill_tokens == 100
    chunks = []
    while sched.has_unfinished:
        out, got = step(sched)
        chunks.append(out.scheduled[0].num_new_tokens)
        assert (got == [req]) == (sum(chunks) >= 100)
    assert chunks == [32, 32, 32, 4, 1, 1]
    assert req.status is RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 3
    assert req.first_token_time is not None and not sched.block_manager.block_table(req.request_id)


def test_without_chunked_prefill_prompts_are_admitted_whole():
    sched = make_scheduler(budget=32, chunked=False)
    sched.add_request(make_request("a", 20))
    sched.add_request(make_request("b", 20))
    out, _ = step(sched)
    assert new_tokens(out) == {"a": 20}
    out, _ = step(sched)
    assert new_tokens(out) == {"a": 1, "b": 20}
    with pytest.raises(RequestTooLarge, match="chunked prefill"):
        sched.add_request(make_request("c", 33))


def test_decode_gets_priority_and_waiting_is_fifo():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 4, max_tokens=8))
    step(sched)  # a prefilled, first token sampled
    for rid in "bcd":
        sched.add_request(make_request(rid, 10, max_tokens=8))
    out, _ = step(sched)
    assert new_tokens(out) == {"a": 1, "b": 10, "c": 5}
    assert sched.num_waiting == 1 and sched.waiting_prefill_tokens == 10
    out, _ = step(sched)
    assert new_tokens(out) == {"a": 1, "b": 1, "c": 5, "d": 9}
    run_to_end(sched)


def test_token_budget_and_max_num_seqs_every_step():
    sched = make_scheduler(num_blocks=256, budget=24, max_seqs=5)
    rng = random.Random(0)
    for i in range(30):
        sched.add_request(make_request(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 9)))
    steps = run_to_end(sched)
    assert all(out.num_batched_tokens <= 24 for out in steps)
    assert max(len(out.scheduled) for out in steps) == 5


def test_scheduled_requests_grouped_by_library():
    sched = make_scheduler(budget=64)
    for rid, lib in [("a", "x"), ("b", None), ("c", "y"), ("d", "x"), ("e", None)]:
        sched.add_request(make_request(rid, 3, library=lib))
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["b", "e", "a", "d", "c"]


def test_prefix_hit_on_admission():
    sched = make_scheduler(block_size=4, budget=64)
    prompt = list(range(10, 40))
    a = make_request("a", prompt, max_tokens=2)
    sched.add_request(a)
    run_to_end(sched)
    b = make_request("b", prompt, max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched)
    assert new_tokens(out) == {"b": 30 - 28}  # 7 full blocks cached, the last 2 computed
    run_to_end(sched)
    assert b.output_token_ids == a.output_token_ids


def test_preemption_recomputes_and_finishes_with_same_tokens():
    def run(num_blocks):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=64)
        reqs = [make_request(f"r{i}", 14, max_tokens=20) for i in range(4)]
        for r in reqs:
            sched.add_request(r)
        steps = run_to_end(sched)
        return reqs, steps

    big, big_steps = run(num_blocks=200)
    small, small_steps = run(num_blocks=12)  # each request needs up to 9 blocks
    assert not any(out.preempted for out in big_steps)
    preempted = [r for out in small_steps for r in out.preempted]
    assert preempted
    for b, s in zip(big, small, strict=True):
        assert s.status is RequestStatus.FINISHED_LENGTH
        assert s.num_tokens == b.num_tokens == 14 + 20
        assert s.output_token_ids == b.output_token_ids


def test_preemption_picks_the_most_recently_admitted():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = make_request("a", 8, max_tokens=12)
    b = make_request("b", 8, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prefilled: 2 + 2 blocks (+ decode slots as they grow)
    seen = None
    for _ in range(10):
        out, _ = step(sched)
        if out.preempted:
            seen = out
            break
    assert seen is not None and seen.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert not sched.block_manager.block_table(b.request_id) and sched.num_waiting == 1
    assert new_tokens(seen) == {"a": 1}
    run_to_end(sched)
    assert a.num_output_tokens == b.num_output_tokens == 12


def test_abort_frees_blocks_wherever_the_request_is():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=16)
    bm = sched.block_manager
    sched.add_request(make_request("a", 12))
    sched.add_request(make_request("b", 30))
    sched.add_request(make_request("c", 30))
    step(sched)  # a whole, b partially; c waits
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert sched.abort_request("b").status is RequestStatus.FINISHED_ABORTED
    assert sched.abort_request("c").is_finished and not bm.block_table("c")
    assert sched.num_waiting == 0 and sched.waiting_prefill_tokens == 0
    assert bm.allocator.num_used == len(bm.block_table("a"))
    assert sched.abort_request("b") is None  # unknown / already finished: ignored
    out = sched.schedule()
    assert set(out.finished_request_ids) == {"b", "c"}
    sched.abort_request("a")  # between schedule and update: update skips it
    assert sched.update_from_output(out, {"a": 5}) == []
    assert not sched.has_unfinished and bm.usage == 0.0
    sched.schedule()
    bm.check_integrity()


def test_finish_request_for_stop_strings():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10)
    sched.add_request(req)
    step(sched)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED, "###")
    assert (
        req.stop_reason == "###"
        and not sched.block_manager.block_table("a")
        and not sched.has_unfinished
    )
    with pytest.raises(ValueError):
        sched.finish_request("a", RequestStatus.RUNNING)


def scripted(tokens):
    it = iter(tokens)
    return lambda req: next(it)


def run_one(token_seq, eos=EOS, **params):
    sched = make_scheduler()
    req = make_request("a", 5, eos=eos, **params)
    sched.add_request(req)
    run_to_end(sched, scripted(token_seq))
    return req


def test_max_tokens():
    req = run_one([7, 8, 9, 10], max_tokens=3)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.output_token_ids == [7, 8, 9]


def test_eos_stops_without_being_appended():
    req = run_one([7, EOS, 9], max_tokens=5)
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == [7] and req.stop_reason is None


def test_ignore_eos():
    req = run_one([7, EOS, 9], max_tokens=3, ignore_eos=True)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.output_token_ids == [7, EOS, 9]


def test_min_tokens_delays_eos_and_stop_tokens():
    req = run_one([EOS, 5, EOS], max_tokens=5, min_tokens=2, stop_token_ids=(5,))
    assert req.output_token_ids == [EOS, 5]
    assert req.status is RequestStatus.FINISHED_STOPPED and req.stop_reason is None


def test_stop_token_ids():
    req = run_one([7, 8, 9], max_tokens=5, stop_token_ids=(8, 11))
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == [7] and req.stop_reason == 8


def test_eos_is_an_ordinary_token_without_eos_id():
    req = run_one([EOS, EOS], eos=None, max_tokens=2)
    assert req.status is RequestStatus.FINISHED_LENGTH and req.output_token_ids == [EOS, EOS]


def test_request_that_never_fits_is_rejected():
    sched = make_scheduler(num_blocks=8, block_size=4)  # 32 token slots
    with pytest.raises(RequestTooLarge, match="exceeds the KV cache capacity"):
        sched.add_request(make_request("a", 30, max_tokens=4))
    sched.add_request(make_request("b", 30, max_tokens=3))  # 32 KV tokens: just fits
    assert issubclass(RequestTooLarge, ValueError)
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("b", 3))
    run_to_end(sched)


def test_missing_sampled_token_is_an_error():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    out = sched.schedule()
    with pytest.raises(KeyError):
        sched.update_from_output(out, {})


def test_update_must_follow_schedule():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    sched.schedule()
    with pytest.raises(AssertionError):
        sched.schedule()


@pytest.mark.parametrize("seed", [0, 1])
def test_simulated_engine_loop(seed):
    """Many requests with shared prefixes, libraries, stop tokens and aborts, through a tight
    cache: every request ends, outputs match an unconstrained run, integrity holds."""
    rng = random.Random(seed)
    stems = [[rng.randrange(10, 60) for _ in range(40)] for _ in range(3)]
    specs = []
    for i in range(120):
        prompt = rng.choice(stems)[: rng.randint(1, 40)] + [rng.randrange(10, 60)]
        specs.append(
            {
                "rid": f"r{i}",
                "prompt": prompt,
                "library": rng.choice([None, "a", "b"]),
                "max_tokens": rng.randint(1, 30),
                "stop_token_ids": (rng.randrange(100, 197),) if i % 5 == 0 else (),
            }
        )

    def run(num_blocks, budget, max_seqs, abort):
        sched = make_scheduler(
            num_blocks=num_blocks, block_size=4, budget=budget, max_seqs=max_seqs
        )
        reqs = {}
        pending = list(specs)
        preemptions = 0
        while pending or sched.has_unfinished:
            for _ in range(min(len(pending), 7)):
                s = pending.pop(0)
                reqs[s["rid"]] = r = make_request(
                    s["rid"],
                    s["prompt"],
                    library=s["library"],
                    max_tokens=s["max_tokens"],
                    stop_token_ids=s["stop_token_ids"],
                )
                sched.add_request(r)
            out, _ = step(sched)
            preemptions += len(out.preempted)
            if abort and sched.num_running and rng.random() < 0.05:
                sched.abort_request(rng.choice([s.request.request_id for s in out.scheduled]))
        sched.schedule()
        assert all(
            r.is_finished and not sched.block_manager.block_table(r.request_id)
            for r in reqs.values()
        )
        assert sched.block_manager.usage == 0.0
        return reqs, preemptions

    free, _ = run(num_blocks=2000, budget=512, max_seqs=64, abort=False)
    tight, preemptions = run(num_blocks=40, budget=48, max_seqs=12, abort=False)
    assert preemptions > 0
    for rid, r in free.items():
        assert tight[rid].output_token_ids == r.output_token_ids
        assert tight[rid].status is r.status
    aborted, _ = run(num_blocks=40, budget=48, max_seqs=12, abort=True)
    assert any(r.status is RequestStatus.FINISHED_ABORTED for r in aborted.values())


def test_token_ids_slice_matches_all_token_ids():
    from moska.engine.request import Request
    from moska.engine.sampling_params import SamplingParams

    req = Request("r", [5, 6, 7, 8], SamplingParams(max_tokens=8))
    req.output_token_ids.extend([9, 10, 11])
    full = req.all_token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert req.token_ids_slice(start, end) == full[start:end], (start, end)
