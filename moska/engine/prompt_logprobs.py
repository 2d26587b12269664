"""Log-probabilities of prompt tokens (`SamplingParams.prompt_logprobs`; `echo` with `logprobs`
on /v1/completions, which lm-evaluation-harness scores with).

The row of prompt position p predicts prompt token p + 1, so a step that computes positions
[start, end) of a prompt of P tokens scores the prompt tokens start + 1 .. min(end, P - 1)
(the last prompt row predicts the first output token: that one the sampler handles). With
chunked prefill a prompt is scored over several steps, in order. Logprobs are of the raw
logits, as for sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moska.engine.transfer import to_device, to_host_async

_ROWS_PER_SLICE = 512  # logits of a long prompt in slices: [512, V] fp32 at a time


@dataclass
class PromptRows:
    """One request's prompt rows in a step: flat rows first .. first + len(targets) - 1
    score prompt tokens start + 1 .. start + len(targets)."""

    request_id: str
    start: int  # prompt position of the first row
    first: int  # its row in the step's packed tokens
    targets: list[int]  # prompt token each row predicts
    k: int  # top alternatives per token


def rows_of(request_id: str, prompt: list[int], start: int, end: int, first: int, k: int | None):
    """The PromptRows of a request computing positions [start, end) from packed row `first`,
    or None when it scores nothing this step (no prompt_logprobs, or past its prompt)."""
    stop = min(end, len(prompt) - 1)
    if k is None or start >= stop:
        return None
    return PromptRows(request_id, start, first, prompt[start + 1 : stop + 1], k)


class PromptLogprobBatch:
    """One step's prompt logprobs, on their way to the host (as SampledBatch)."""

    def __init__(self, rows: list[PromptRows], chosen, top_v, top_i) -> None:
        self._rows = rows
        self._host = [to_host_async(t) for t in (chosen, top_v, top_i)]
        self._event = None
        if chosen.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def to_host(self) -> dict[str, tuple[int, list[tuple[float, dict[int, float]]]]]:
        """request id -> (prompt position of its first scored token, [(logprob, top)])."""
        if self._event is not None:
            self._event.synchronize()
        chosen, top_v, top_i = (t.tolist() for t in self._host)
        out: dict[str, tuple[int, list[tuple[float, dict[int, float]]]]] = {}
        j = 0
        for r in self._rows:
            entries = []
            for _ in r.targets:
                entries.append((chosen[j], dict(zip(top_i[j][: r.k], top_v[j][: r.k]))))
                j += 1
            out[r.request_id] = (r.start + 1, entries)
        return out


def compute(model, hidden: torch.Tensor, rows: list[PromptRows]) -> PromptLogprobBatch | None:
    """Queue the prompt logprobs of `rows` from the step's hidden states [T, H]."""
    if not rows:
        return None
    dev = hidden.device
    flat = [r.first + i for r in rows for i in range(len(r.targets))]
    targets = [t for r in rows for t in r.targets]
    k = max(1, max(r.k for r in rows))
    chosen, top_v, top_i = [], [], []
    for s in range(0, len(flat), _ROWS_PER_SLICE):
        idx = to_device(flat[s : s + _ROWS_PER_SLICE], dev, torch.int64)
        tgt = to_device(targets[s : s + _ROWS_PER_SLICE], dev, torch.int64)
        lp = torch.log_softmax(model.compute_logits(hidden.index_select(0, idx)), dim=-1)
        chosen.append(lp.gather(1, tgt.unsqueeze(1)).squeeze(1))
        v, i = lp.topk(k, dim=-1)
        top_v.append(v)
        top_i.append(i)
    return PromptLogprobBatch(rows, torch.cat(chosen), torch.cat(top_v), torch.cat(top_i))
