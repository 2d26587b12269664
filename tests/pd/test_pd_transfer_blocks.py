"""#19, session 15: the predicted transfer counts every block the prefill instance sends.

The prefill instance sends the decode instance all of a prompt's full blocks, those it
found in its own prefix cache too (the decode instance has none of them), and the front
end learns the transfer's seconds per block over all of them (`transferred`). The stage
prediction counted only the uncached blocks: at a trace's ~70% hit rate, ~30% of the
transfer it had learnt."""

from __future__ import annotations

import pytest

from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo

BS = 16


def _sched() -> tuple[GlobalScheduler, Instance]:
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64, 4096)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64, 4096)
    sched = GlobalScheduler([p, d], SLO())
    sched.set_step_coef(p, [0.002, 0.02, 0.0, 0.3, 0.0])
    sched.set_step_coef(d, [0.002, 0.02, 0.0, 0.3, 0.0])
    return sched, p


@pytest.mark.parametrize("cached_share", [0.0, 0.8])
def test_stage_counts_the_transfer_of_every_block(cached_share):
    sched, p = _sched()
    sched.transferred(250, 0.5)  # 2 ms per block, learnt over all the blocks sent
    tokens = 250 * BS + 5
    usable = (tokens - 1) // BS
    own = list(range(10_000, 10_000 + usable))
    shared = int(usable * cached_share)
    sched.index.record(p.name, own[:shared])  # a prefix p already holds
    plan = sched.plan(RequestInfo(tuple(own), tokens, 8), now=10.0)
    assert isinstance(plan, Plan) and plan.cached_blocks == shared
    prefill = sched.prefill_s(tokens - shared * BS, p)
    # all 250 blocks' transfer (0.5 s), whatever the cache held (old: 0.1 s at 80% cached)
    assert plan.stage_x == pytest.approx(prefill + 0.5, rel=1e-9)
