"""The front end's decision log (`/pd/stats` `decisions`, #19): per request, what the global
scheduler predicted and from what (`GlobalScheduler.last_inputs`: the live queue, the stage
fits' x, the decode seats) and, once known, what the stages took (`observed_stage_s`:
admission -> KV at the decode instance; `observed_first_s`: decode request -> first token).
`moska bench trace` keeps it per round, so that a miss or a run of 429s can be traced to
the stage and the input that made it."""

from __future__ import annotations

from moska.pd.scheduler import Rejection

MAX_DECISIONS = 5000  # per Stats (a bench round resets it): a long-running router stops there


def decision_record(plan, prompt_tokens: int, now: float, inputs: dict[str, float]) -> dict:
    """One decision: `plan` (a `Plan` or a `Rejection`) at `now` (time.monotonic())."""
    rec: dict = {"t": now, "prompt_tokens": prompt_tokens}
    if isinstance(plan, Rejection):
        rec["decision"] = plan.reason
    else:
        rec |= {"decision": "admit", "prefill": plan.prefill.name, "decode": plan.decode.name}
        rec["cached_blocks"] = plan.cached_blocks
    rec |= {"ttft_s": plan.predicted_ttft_s, "tpot_s": plan.predicted_tpot_s, **inputs}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
