"""Scheduler.recover_step: a step that raised is rolled back; its requests run alone once,
a request that fails alone is the culprit and ends, the others finish with the tokens
they would have had without the failure."""

import random

from test_scheduler import fake_token, make_request, make_scheduler

from moska.engine.request import RequestStatus


def _run(sched, reqs, poisoned=frozenset(), fail_steps=frozenset(), max_steps=5000):
    """Drive the scheduler to the end. A step fails when it holds a poisoned request or
    its index is in `fail_steps` and it is shared (a one-off fault). Returns (steps, ids ended by recovery)."""
    for r in reqs:
        sched.add_request(r)
    ended, steps = [], []
    while sched.has_unfinished:
        out = sched.schedule()
        index = len(steps)
        steps.append(out)
        assert index < max_steps
        ids = {s.request.request_id for s in out.scheduled}
        if ids & poisoned or (index in fail_steps and len(ids) > 1):
            ended += [r.request_id for r in sched.recover_step(out)]
            sched.block_manager.check_integrity()
            continue
        sampled = {s.request.request_id: fake_token(s.request) for s in out.scheduled if s.samples}
        sched.update_from_output(out, sampled)
        sched.block_manager.check_integrity()
    sched.schedule()  # idle: integrity, and no block is held
    return steps, ended


def _fresh(n, seed):
    rng = random.Random(seed)
    return [
        make_request(f"r{i}", rng.randint(3, 30), max_tokens=rng.randint(2, 9)) for i in range(n)
    ]


def test_a_one_off_fault_changes_no_tokens():
    ref = _fresh(6, 0)
    _run(make_scheduler(budget=32), ref)
    got = _fresh(6, 0)
    steps, ended = _run(make_scheduler(budget=32), got, fail_steps={1, 2, 9})
    assert ended == []
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in ref]
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in got)
    # right after a shared step failed, its requests ran one at a time
    assert len(steps[1].scheduled) > 1 and len(steps[2].scheduled) == 1


def test_a_poisoned_request_fails_alone_and_the_others_finish():
    ref = _fresh(5, 1)
    _run(make_scheduler(budget=40), ref)
    got = _fresh(5, 1)
    poison = make_request("poison", 12, max_tokens=4)
    steps, ended = _run(make_scheduler(budget=40), [*got[:2], poison, *got[2:]], {"poison"})
    assert ended == ["poison"] and poison.status is RequestStatus.FINISHED_ABORTED
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in ref]
    # the culprit was identified in a step of its own
    last_poison = [s for s in steps if "poison" in {x.request.request_id for x in s.scheduled}]
    assert len(last_poison[-1].scheduled) == 1


def test_recover_with_a_step_in_flight_drops_its_tokens_in_flight():
    sched = make_scheduler(budget=64)
    a, b = make_request("a", 5, max_tokens=6), make_request("b", 7, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.update_from_output(out, {"a": fake_token(a), "b": fake_token(b)})
    first = (list(a.output_token_ids), list(b.output_token_ids))
    prev = sched.schedule()
    sched.update_from_output(prev, None)  # queued ahead: its tokens in flight
    assert a.num_in_flight == 1 and a.output_token_ids == first[0]
    assert a.num_tokens == a.num_known_tokens + 1
    out = sched.schedule()  # the next step fails while `prev` is still in flight
    assert sched.recover_step(out, [s.request for s in prev.scheduled]) == []
    assert (a.output_token_ids, b.output_token_ids) == first
    assert a.status is b.status is RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert not sched.block_manager.block_table("a")
    sched.block_manager.check_integrity()
    alone = sched.schedule()
    assert [s.request.request_id for s in alone.scheduled] == ["a"]
