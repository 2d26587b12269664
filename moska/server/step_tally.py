"""What one engine step's outputs tell the server: each stream's token count and times, the
latency metrics (time to first token, inter-token latency, end to end, finish reasons,
chunks routed), the admission's check of its TTFT prediction, and the step's work for the
step-time model (prompt tokens, decode rows, library pairs). Runs on the engine thread
(`server/async_engine.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moska.engine.outputs import RequestOutput
from moska.server.admission import AdmissionController
from moska.server.metrics import ServerMetrics
from moska.server.request_stream import RequestStream


@dataclass
class StepTally:
    deliveries: list[tuple[RequestStream, RequestOutput]] = field(default_factory=list)
    finished: int = 0  # streams that ended (removed from the stream table)
    prefill_tokens: int = 0  # prompt tokens of the requests whose first token came
    num_decode: int = 0  # streams that got a later token
    new_tokens: int = 0
    library_pairs: int = 0  # (library token, new token) pairs attended


def tally_outputs(
    outputs: Sequence[RequestOutput],
    streams: dict[str, RequestStream],
    metrics: ServerMetrics,
    admission: AdmissionController,
    now: float,
) -> StepTally:
    """Account a step's outputs that reached the host at `now` (time.monotonic): update
    their streams and the metrics; a finished request's stream leaves `streams`. Outputs
    of streams no longer in `streams` (aborted meanwhile) are skipped."""
    m, t = metrics, StepTally()
    for out in outputs:
        stream = streams.get(out.request_id)
        if stream is None:  # aborted meanwhile
            continue
        n_new = len(out.new_token_ids)
        t.new_tokens += n_new
        stream.generated += n_new
        attend = stream.cost.library_attend if stream.cost is not None else 0
        if n_new:
            if stream.first_token_time is None:
                stream.first_token_time = now
                t.prefill_tokens += stream.num_prompt_tokens
                # only the prompt tokens computed attend the library: a prefix-cache hit
                # (a repeated prompt) taught admission that library prefill was cheap
                cached = getattr(out, "num_cached_tokens", 0) or 0
                t.library_pairs += attend * max(0, stream.num_prompt_tokens - cached)
                m.ttft.observe(now - stream.arrival)
                if stream.predicted_ttft_s is not None:
                    observed = now - stream.arrival
                    m.ttft_prediction_error.observe(observed - stream.predicted_ttft_s)
                    admission.observe_ttft(stream.predicted_ttft_s, observed)
            else:
                t.num_decode += 1
                t.library_pairs += attend * n_new
                assert stream.last_token_time is not None
                gap = (now - stream.last_token_time) / n_new
                for _ in range(n_new):
                    m.itl.observe(gap)
            stream.last_token_time = now
        if out.routed_chunks:
            m.chunks_routed.inc(len(out.routed_chunks))
        if out.finished:
            del streams[out.request_id]
            t.finished += 1
            reason = out.outputs[0].finish_reason if out.outputs else None
            m.requests.labels(reason or "unknown").inc()
            m.e2e.observe(now - stream.arrival)
        t.deliveries.append((stream, out))
    return t
