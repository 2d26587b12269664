"""What the fidelity benchmark measures, through the real engine and library path: the loss
of token sequences after a library, and the exact-match accuracy of greedy answers, for one
(library, top_k, routing policy) setting. Used by moska.bench.fidelity."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from moska.engine.sampling_params import SamplingParams
from moska.routing import RoutingPolicy

_ids = itertools.count()


@dataclass(frozen=True)
class Measured:
    value: float  # mean loss (nats/token) or accuracy
    coverage: float | None  # mean share of the library's attention mass its routed chunks held
    n: int  # tokens scored, or questions asked


def sequence_loss(
    engine,
    sequences: list[list[int]],
    library: str | None,
    top_k: int | None,
    policy: RoutingPolicy | None,
    skip: int = 0,
    report: bool = True,
) -> Measured:
    """Mean next-token loss (nats) of ``sequences`` read after ``library`` (None: alone),
    from the engine's prompt logprobs; the first ``skip`` scored tokens of each are left
    out (a BOS-led sequence without a library scores one token more than the same text
    after a library)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, routing=policy)
    rids = {}
    for seq in sequences:
        rid = f"fid-{next(_ids)}"
        engine.add_request(
            rid,
            seq,
            params,
            library=library,
            top_k_chunks=top_k,
            report_routing=report and library is not None,
        )
        rids[rid] = seq
    outs = _run(engine, rids)
    total, count, cov = 0.0, 0, []
    for rid in rids:
        lps = [t.logprob for t in outs[rid].prompt_logprobs if t is not None][skip:]
        total -= sum(lps)
        count += len(lps)
        if outs[rid].routing_coverage is not None:
            cov.append(outs[rid].routing_coverage)
    return Measured(total / max(count, 1), _mean(cov), count)


def answer_accuracy(
    engine,
    questions: list[tuple[list[int], list[int]]],  # (prompt ids, answer ids)
    library: str | None,
    top_k: int | None,
    policy: RoutingPolicy | None,
    report: bool = True,
) -> Measured:
    """Share of questions whose greedy answer equals the expected tokens, token by token."""
    items = [(p, a, library, top_k) for p, a in questions]
    return answers_accuracy(engine, items, policy, report)


def answers_accuracy(
    engine,
    items: list[tuple[list[int], list[int], str | None, int | None]],  # prompt, answer, lib, k
    policy: RoutingPolicy | None,
    report: bool = True,
) -> Measured:
    """``answer_accuracy`` with each question's own library and k, all in one batch."""
    rids = {}
    for prompt, answer, library, top_k in items:
        params = SamplingParams(
            max_tokens=len(answer), temperature=0.0, ignore_eos=True, routing=policy
        )
        rid = f"fid-{next(_ids)}"
        engine.add_request(
            rid,
            prompt,
            params,
            library=library,
            top_k_chunks=top_k,
            report_routing=report and library is not None,
        )
        rids[rid] = answer
    outs = _run(engine, rids)
    right, cov = 0, []
    for rid, answer in rids.items():
        right += list(outs[rid].outputs[0].token_ids) == list(answer)
        if outs[rid].routing_coverage is not None:
            cov.append(outs[rid].routing_coverage)
    return Measured(right / max(len(rids), 1), _mean(cov), len(rids))


def _run(engine, rids) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id in rids:
                done[out.request_id] = out
    missing = set(rids) - set(done)
    assert not missing, f"requests that never finished: {sorted(missing)[:4]}"
    return done


def _mean(xs: list[float]) -> float | None:
    return None if not xs else sum(xs) / len(xs)


def k_for(fraction: float, num_chunks: int) -> int:
    """Chunks kept for a fraction of a library (at least one)."""
    return max(1, math.floor(fraction * num_chunks + 0.5))
