"""Tokens in flight (asynchronous scheduling) in the scheduler alone: driven as the engine
drives it (schedule the next step, land the previous step's tokens, count the next step's
in flight), with stop tokens, min_tokens, preemption and failed steps, every request ends
with the tokens and finish reason of the synchronous run, and no id ever stands in for a
token in flight."""

import random

from test_scheduler import make_request, make_scheduler

from moska.engine.request import RequestStatus


def token_of(req) -> int:
    """Deterministic in the known tokens only (what a device would sample from them)."""
    ids = req.all_token_ids
    return 100 + (sum(ids) * 31 + len(ids)) % 40


def _requests(seed: int):
    rng = random.Random(seed)
    reqs = []
    for i in range(12):
        reqs.append(
            make_request(
                f"r{i}", rng.randrange(3, 30), eos=100 + rng.randrange(40),
                max_tokens=rng.randrange(1, 9), min_tokens=rng.randrange(0, 3),
                stop_token_ids=[100 + rng.randrange(40)],
            )
        )  # fmt: skip
    return reqs


def _check(sched) -> None:
    sched.block_manager.check_integrity()
    assert sched.waiting_prefill_tokens == sum(r.num_tokens for r in sched._waiting)
    for r in sched._requests.values():
        r.check_invariants()
        assert r.num_in_flight in (0, 1) and all(t >= 100 for t in r.output_token_ids)


def run_sync(reqs):
    sched = make_scheduler(num_blocks=14, block_size=4, budget=24, max_seqs=4)
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update_from_output(out, {s.request.request_id: token_of(s.request)
                                       for s in out.scheduled if s.samples})  # fmt: skip
        _check(sched)
    return {r.request_id: (r.output_token_ids, r.status, r.stop_reason) for r in reqs}


def run_async(reqs, fail_every: int = 0):
    sched = make_scheduler(num_blocks=14, block_size=4, budget=24, max_seqs=4)
    for r in reqs:
        sched.add_request(r)
    prev = None  # (output, requests whose token is in flight)
    steps = 0
    lost = set()  # ended by a failed step: reached their length on a token it discarded
    while sched.has_unfinished or prev is not None:
        out = sched.schedule()
        steps += 1
        assert steps < 2000
        sampling = [s.request for s in out.scheduled if s.samples]
        if fail_every and steps % fail_every == 0 and len(out.scheduled) > 1:
            extra = [] if prev is None else [s.request for s in prev[0].scheduled]
            for r in sched.recover_step(out, extra):  # a one-off fault: only these end
                assert r.status is RequestStatus.FINISHED_LENGTH and r in extra
                assert r.num_output_tokens == r.sampling_params.max_tokens - 1
                lost.add(r.request_id)
            prev = None  # its tokens never reach the host
            _check(sched)
            continue
        if prev is not None:  # the previous step's tokens reach the host
            for req in prev[1]:
                if req.num_in_flight:  # else it ended meanwhile (a stop token, abort)
                    sched.resolve_in_flight(req, token_of(req))
        if out.scheduled:
            sched.update_from_output(out, None)
            prev = (out, [r for r in sampling if r.num_in_flight])
        else:
            prev = None
        _check(sched)
    assert all(r.num_in_flight == 0 for r in reqs)
    return {r.request_id: (r.output_token_ids, r.status, r.stop_reason) for r in reqs}, lost


def test_tokens_in_flight_end_as_the_synchronous_run():
    ends = set()
    for seed in range(4):
        want = run_sync(_requests(seed))
        ends |= {(status, reason is None) for _, status, reason in want.values()}
        assert run_async(_requests(seed)) == (want, set())
        got, lost = run_async(_requests(seed), fail_every=5)
        assert len(lost) < len(want)
        assert {k: v for k, v in got.items() if k not in lost} == {
            k: v for k, v in want.items() if k not in lost
        }
        for rid in lost:  # the tokens that reached the host before the failure
            assert want[rid][0][: len(got[rid][0])] == got[rid][0]
    stopped, length = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH
    assert {(stopped, True), (stopped, False), (length, True)} <= ends  # eos, stop id, length


def test_a_stop_token_in_flight_is_dropped_and_a_length_end_becomes_stop():
    sched = make_scheduler()
    a = make_request("a", 5, max_tokens=2, stop_token_ids=[120])
    sched.add_request(a)
    sched.update_from_output(sched.schedule(), None)
    assert a.num_in_flight == 1 and a.output_token_ids == [] and a.num_output_tokens == 1
    assert a.num_tokens == a.num_known_tokens + 1 == 6
    sched.resolve_in_flight(a, 111)
    assert a.output_token_ids == [111] and a.num_in_flight == 0
    sched.update_from_output(sched.schedule(), None)  # its last token: the length ends it
    assert a.status is RequestStatus.FINISHED_LENGTH and not sched.has_unfinished
    sched.resolve_in_flight(a, 120)  # ... but it was a stop token
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason == 120
    assert a.output_token_ids == [111] and a.num_in_flight == 0
    sched.block_manager.check_integrity()
