"""What a step gives back: a `PendingStep` while its forward and sampling are queued on the
device, then, once its tokens reach the host, a `StepResult` value: the sampled tokens,
their logprobs, each library request's `RoutingReport` and the prompt logprobs.

The routing reports are read from the reports the bound attention kept during the forward
(attention/routing_report.py); the step's metadata is its input and is never read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moska.attention.routing_report import GroupRouting
from moska.engine.prompt_logprobs import PromptLogprobBatch
from moska.engine.request import Request
from moska.engine.sampler import SampledBatch


@dataclass(frozen=True)
class RoutingReport:
    """What one request's routing did in a step: the chunks its sampled row read at the last
    recorded layer (KV head 0), and, with report_routing, the share of the library's
    attention mass they cover (mean over the sampled layers) and that share per sampled
    layer (where routing loses mass, which the mean hides)."""

    chunks: list[int]
    coverage: float | None = None
    coverage_by_layer: dict[int, float] | None = None


@dataclass
class StepResult:
    sampled: dict[str, int]  # request_id -> new token (only requests that finished their tokens)
    logprobs: dict[str, tuple[float, dict[int, float]]]
    routing: dict[str, RoutingReport] = field(default_factory=dict)  # library requests only
    # request id -> (prompt position of its first scored token, [(logprob, top)]); only
    # requests with prompt_logprobs whose prompt rows this step computed
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)


@dataclass
class PendingStep:
    """A step whose forward and sampling are queued on the device; ``result()`` waits for
    its tokens. ``tokens`` (on the device) can feed the next step before that."""

    sample_reqs: list[Request]
    batch: SampledBatch | None
    routing: list[GroupRouting]  # one per library group, in lib_rows' order
    lib_rows: dict[str, list[int]]  # build id -> the step's rows that read it
    record_reqs: dict[str, list[tuple[Request, int]]]  # build id -> (request, sampled row)
    decode_only: bool = False  # every row is one request's single new token
    # a row's sampler reads its token ids (penalties, logits processors): the next step
    # must not be scheduled before this one's tokens reach the host
    needs_history: bool = False
    prompt_lp: PromptLogprobBatch | None = None  # prompt_logprobs of this step's prompt rows
    # its routing reports are its own (snapshots of a graph's): the next step may be
    # queued before they are read
    routing_owned: bool = False

    @property
    def reads_library(self) -> bool:
        return bool(self.lib_rows)

    def token_index(self) -> dict[str, int]:
        """request id -> row of ``batch.tokens`` holding its new token."""
        return {r.request_id: i for i, r in enumerate(self.sample_reqs)}

    def result(self) -> StepResult:
        result = StepResult(sampled={}, logprobs={})
        if self.prompt_lp is not None:
            result.prompt_logprobs = self.prompt_lp.to_host()
        if self.batch is None:
            return result
        out = self.batch.to_host()
        for req, tok, lp in zip(self.sample_reqs, out.token_ids, out.logprobs):
            result.sampled[req.request_id] = tok
            if lp is not None:
                result.logprobs[req.request_id] = lp
        for report, name in zip(self.routing, self.lib_rows):
            reqs = self.record_reqs.get(name, [])
            result.routing.update(routing_reports(report, self.lib_rows[name], reqs))
        return result


def routing_reports(
    report: GroupRouting, rows: list[int], reqs: list[tuple[Request, int]]
) -> dict[str, RoutingReport]:
    """request id -> its RoutingReport, for each (request, sampled row) of a group whose
    rows are `rows`; empty when the group recorded nothing."""
    if not report.selections or not reqs:
        return {}
    sel = report.selections[max(report.selections)]
    local = {row: i for i, row in enumerate(rows)}
    # one copy to the host and array ops: B x KV heads x k selections (16K at B = 256,
    # 8 heads, k = 8) cost milliseconds a step as a Python loop
    ids, head, chunk = torch.stack([sel.req, sel.kv_head, sel.chunk]).cpu().numpy()
    ids, chunk = ids[head == 0], chunk[head == 0]
    order = np.lexsort((chunk, ids))  # by request row, then chunk
    ids, chunk = ids[order], chunk[order]
    starts = np.flatnonzero(np.diff(ids)) + 1
    by_row = {
        int(ids[a]): part.tolist()
        for a, part in zip(np.r_[0, starts], np.split(chunk, starts))
        if part.size
    }
    mean, per_layer = None, {}
    if report.coverage:
        mean = torch.stack(list(report.coverage.values())).mean(dim=0).tolist()  # [n]
        per_layer = {layer: c.tolist() for layer, c in sorted(report.coverage.items())}
    out = {}
    for req, row in reqs:
        cov = layers = None
        if mean is not None and req.report_routing:
            cov = mean[local[row]]
            layers = {layer: c[local[row]] for layer, c in per_layer.items()}
        out[req.request_id] = RoutingReport(by_row.get(local[row], []), cov, layers)
    return out
