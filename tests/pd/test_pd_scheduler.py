"""The global scheduler (plain Python): the index picks the instance holding the prefix,
the decode pick follows load and free KV, and requests that would miss an SLO are
rejected before any prefill, with a Retry-After; over HTTP, a rejection reaches no
instance."""

from __future__ import annotations

import random

import httpx
import pytest

from moska.pd.index import PrefixIndex, block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, Rejection, RequestInfo

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes
BS = 16


def _inst(name, role, rank, num_blocks=1000, seats=8):
    return Instance(name, f"http://{name}", role, rank, BS, num_blocks, seats)


def _cluster(**slo):
    insts = [_inst("p0", "prefill", 0), _inst("p1", "prefill", 1)]
    insts += [_inst("d0", "decode", 2), _inst("d1", "decode", 3)]
    return GlobalScheduler(insts, SLO(**slo)), insts


def _req(tokens, max_tokens=8, namespace=None):
    return RequestInfo(tuple(block_hashes(tokens, BS, namespace)), len(tokens), max_tokens)


def test_block_hashes_chain_and_namespace():
    rng = random.Random(0)
    a = [rng.randrange(1000) for _ in range(80)]
    b = a[:48] + [t + 1 for t in a[48:]]
    ha, hb = block_hashes(a, BS), block_hashes(b, BS)
    assert len(ha) == 5 and ha[:3] == hb[:3] and ha[3] != hb[3]
    assert block_hashes(a, BS, ("lib", None))[0] != ha[0]  # another library: another name
    c = list(a)
    c[0] += 1  # a change in front changes every later block's hash (chained)
    assert all(x != y for x, y in zip(block_hashes(c, BS), ha))


def test_index_lru_capacity():
    index = PrefixIndex()
    index.add_instance("p", capacity_blocks=3)
    index.record("p", [1, 2, 3])
    assert index.match("p", [1, 2, 3, 4]) == 3
    index.record("p", [9])  # evicts the least recently used (1)
    assert index.match("p", [1, 2]) == 0 and index.size("p") == 3


def test_prefill_goes_where_the_prefix_is_cached():
    sched, insts = _cluster()
    rng = random.Random(1)
    shared = [rng.randrange(1000) for _ in range(20 * BS)]
    sched.index.record("p1", block_hashes(shared, BS))
    plan = sched.plan(_req(shared + [5, 6, 7]), now=0.0)
    assert isinstance(plan, Plan) and plan.prefill.name == "p1" and plan.cached_blocks == 20
    # a prompt cached nowhere goes to the idle instance, not the busy one
    sched.plan(_req([rng.randrange(1000) for _ in range(40 * BS)]), now=0.0)  # lands on p0
    other = sched.plan(_req([rng.randrange(1000) for _ in range(4 * BS)]), now=0.0)
    busy = max(insts[:2], key=lambda p: p.queue_s(0.0))
    assert other.prefill.name != busy.name


def test_decode_pick_by_load_and_full_decode_rejects():
    insts = [_inst("p0", "prefill", 0), _inst("d0", "decode", 1, num_blocks=10, seats=2)]
    insts.append(_inst("d1", "decode", 2, num_blocks=10, seats=2))
    sched = GlobalScheduler(insts, SLO())
    picks = [sched.plan(_req(list(range(i, i + 40)), max_tokens=8), now=0.0) for i in range(4)]
    assert all(isinstance(p, Plan) for p in picks)
    assert sorted(p.decode.name for p in picks) == ["d0", "d0", "d1", "d1"]  # balanced
    full = sched.plan(_req(list(range(100, 140)), max_tokens=8), now=0.0)
    assert isinstance(full, Rejection) and full.reason == "decode_full"
    assert full.retry_after_s >= 1
    # when the decode side will have drained by the end of prefill (~26 ms), it is admitted
    last_end = max(e for d in insts[1:] for _, e in d.active.values())
    assert isinstance(sched.plan(_req(list(range(200, 240))), now=last_end - 0.01), Plan)


def test_ttft_and_tpot_slo_reject_before_any_work():
    sched, insts = _cluster(ttft_s=1.0)
    long_prompt = list(range(5_000))  # predicted prefill beyond 1 s
    r = sched.plan(_req(long_prompt), now=0.0)
    assert isinstance(r, Rejection) and r.reason == "ttft" and r.predicted_ttft_s > 1.0
    assert not any(i.prefills or i.active for i in insts)  # nothing reserved
    ok = sched.plan(_req(list(range(40))), now=0.0)
    assert isinstance(ok, Plan) and ok.predicted_ttft_s <= 1.0
    sched2, _ = _cluster(tpot_s=1e-4)
    r2 = sched2.plan(_req(list(range(40))), now=0.0)
    assert isinstance(r2, Rejection) and r2.reason == "tpot"
    huge = sched2.plan(_req(list(range(40)), max_tokens=10**6), now=0.0)
    assert isinstance(huge, Rejection) and huge.reason == "too_large"


def test_step_times_come_from_the_instances():
    sched, insts = _cluster(ttft_s=2.0)
    prompt = list(range(1000))
    assert isinstance(sched.plan(_req(prompt), now=0.0), Plan)
    for inst in insts:
        inst.prefills.clear(), inst.active.clear()
    slow = (0.01, 3.0, 0.0, 0.5, 0.0)  # 3 s per 1K prefill tokens
    for p in insts[:2]:
        sched.set_step_coef(p, slow)
    r = sched.plan(_req([t + 1 for t in prompt]), now=0.0)  # not cached anywhere
    assert isinstance(r, Rejection) and r.reason == "ttft" and r.predicted_ttft_s > 3.0
    assert isinstance(sched.plan(_req(prompt), now=0.0), Plan)  # cached: only the tail
    # a long prompt is prefilled in steps of the instance's token budget
    insts[0].max_batched_tokens = 256
    assert sched.prefill_s(1000, insts[0]) == pytest.approx(4 * 0.01 + 3.0)
    sched.set_step_coef(insts[0], [float("nan")] * 5)  # a broken report changes nothing
    assert sched.prefill_s(1000, insts[0]) == pytest.approx(4 * 0.01 + 3.0)


def test_http_rejection_reaches_no_instance(pd_cluster):
    from moska.pd.scheduler import SLO

    url, _, apps, front = pd_cluster
    engines = {n: a.state.moska.engine for n, a in apps.items()}
    before = {n: e.stats().prompt_tokens_computed for n, e in engines.items()}
    old = front.scheduler.slo
    front.scheduler.slo = SLO(ttft_s=1e-6)
    # no probe: on the shared cluster an instance earlier tests taught is idle and quiet for
    # more than this SLO, so the probe rule (tests/pd/test_pd_probe_slo.py) would admit one
    # (the test then failed or passed by test order); this test is about the rejection path
    probe, front.scheduler.ttft.probe = front.scheduler.ttft.probe, lambda *a, **k: False
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "moska-tiny", "prompt": "hi " * 30,
                       "max_tokens": 4}, timeout=30)  # fmt: skip
    finally:
        front.scheduler.slo = old
        front.scheduler.ttft.probe = probe
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert int(r.headers["retry-after-ms"]) >= 1
    assert "ttft" in r.json()["error"]["message"]
    assert {n: e.stats().prompt_tokens_computed for n, e in engines.items()} == before


def test_slowdown_follows_load_and_fades():
    sched, _ = _cluster(ttft_s=1.0)
    req = _req(list(range(40)))
    plan = sched.plan(req, now=0.0)
    assert isinstance(plan, Plan)
    for _ in range(10):  # every stage ran 8x slower than predicted
        sched.observe_stage("prefill", 8 * plan.predicted_stage_s, plan.predicted_stage_s, 0.0)
    assert sched.slowdown("prefill", 0.0) > 5
    slowed = sched.plan(_req(list(range(100, 140))), now=0.0)
    assert slowed.predicted_ttft_s > 3 * plan.predicted_ttft_s
    # with nothing observed it fades back (no spiral of rejections)
    assert sched.slowdown("prefill", 60.0) < 1.01


def test_tpot_follows_observed_token_times_and_fades():
    sched, insts = _cluster(tpot_s=0.1)
    d0, d1 = insts[2], insts[3]
    plan = sched.plan(_req(list(range(40))), now=0.0)
    assert isinstance(plan, Plan) and plan.predicted_tpot_s < 0.09 and plan.batch == 1
    sched.finished(plan, plan.decode)
    for _ in range(10):  # the decode instances give tokens 20x slower than their step fit
        for d in (d0, d1):
            sched.observe_tpot(d, 20 * 4 * sched.tpot_s(1, d), 4 * sched.tpot_s(1, d), 0.0)
    assert sched.tpot_factor(d0, 0.0) > 15
    r = sched.plan(_req(list(range(100, 140))), now=0.0)
    assert isinstance(r, Rejection) and r.reason == "tpot" and r.predicted_tpot_s > 0.1
    assert not d0.active and not d1.active  # nothing reserved
    # nothing observed since: an idle gap keeps what the decode side is (tpot_factor.py),
    # but it fades, slowly, so a run of TPOT rejections (no new windows) still ends
    assert sched.tpot_factor(d0, 15.0) > 10
    assert sched.tpot_factor(d0, 600.0) < 1.01
    assert isinstance(sched.plan(_req(list(range(200, 240))), now=600.0), Plan)


def test_late_requests_still_count():
    p, d = _inst("p0", "prefill", 0), _inst("d0", "decode", 1, seats=2)
    p.prefills[1] = [1.0, 0.0]  # predicted 1 s, started at 0
    assert p.queue_s(0.25) == pytest.approx(0.75)
    assert p.queue_s(5.0) == pytest.approx(1.0)  # late: still there, counted again
    d.active[1] = [3, 2.0]  # predicted to end at 2 s
    assert d.load_at(3.0) == (0, 0)  # at 1 s: predicted gone by 3 s
    assert d.load_at(3.0, now=2.5) == (1, 3)  # at 2.5 s it has not ended: it still counts
    sched = GlobalScheduler([p, d], SLO())
    d.active[2] = [3, 1.0]
    r = sched.plan(_req(list(range(40))), now=2.5)  # both seats held by late requests
    assert isinstance(r, Rejection) and r.reason == "decode_full"


def test_token_times_report_windows():
    from moska.pd.token_times import WINDOW, TokenTimes

    tt = TokenTimes()
    event = b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
    reports = [tt.add(event, 0.01) for _ in range(2 * WINDOW + 1)]
    assert reports[0] is None  # the first token: its time is the TTFT's
    got = [r for r in reports if r is not None]
    assert len(got) == 2 and all(p == pytest.approx(WINDOW * 0.01) and o >= 0 for o, p in got)
    assert tt.add(b'data: {"choices":[],"usage":{}}\n\ndata: [DONE]\n\n', 0.01) is None
    window = tt.add(event * WINDOW, 0.01)  # a chunk of several events counts them all
    assert window is not None and window[1] == pytest.approx(WINDOW * 0.01)


def test_faster_tokens_lower_the_tpot_factor_not_the_stage_slowdown():
    sched, insts = _cluster(ttft_s=1.0)
    for _ in range(10):  # a pessimistic fit (still holding slow first steps): 5x too slow
        sched.observe_stage("prefill", 0.2, 1.0, 0.0)
        sched.observe_tpot(insts[2], 0.2, 1.0, 0.0)
    assert sched.slowdown("prefill", 0.0) == 1.0
    assert sched.tpot_factor(insts[2], 0.0) == pytest.approx(0.2)  # followed, not floored
    for _ in range(3):  # then a slow window: the factor is a ratio of decaying sums
        sched.observe_tpot(insts[2], 3.0, 1.0, 0.0)
    assert 1.0 < sched.tpot_factor(insts[2], 0.0) < 3.0


def test_median_tpot_prediction_tracks_observed_token_times():
    """#19: tokens come 5x faster than the step fit says, with jitter; the admission
    predictions must follow them at the median (a factor floored at 0.5 held every
    prediction at ~2x what was seen)."""
    sched, insts = _cluster()
    rng = random.Random(0)
    now = 0.0
    for i in range(200):  # 4-token windows relayed from both decode instances
        d, batch = insts[2 + i % 2], 1 + i % 6
        pred = 4 * sched.tpot_s(batch, d)
        sched.observe_tpot(d, pred * 0.2 * rng.lognormvariate(0.0, 0.2), pred, now)
        now += 0.02
    ratios = []
    for k in range(12):  # admissions joining growing batches
        plan = sched.plan(_req(list(range(1000 * k, 1000 * k + 40))), now=now)
        assert isinstance(plan, Plan)
        seen = 0.2 * sched.tpot_s(plan.batch, plan.decode)  # the median token time there
        ratios.append(seen / plan.predicted_tpot_s)
    ratios.sort()
    median = (ratios[5] + ratios[6]) / 2
    assert 0.85 < median < 1.15, ratios
