"""What a step does to the logits before temperature: logit_bias, logits processors, penalties.

Applied per row in that order (see SamplingParams). Rows that use none of them cost nothing:
a batch without any returns its logits untouched. Bias and penalties are batched over the
rows that use them (one scatter each); logits processors run per row, in Python, as vLLM's
do. Counts come from the rows' token ids, uploaded for the rows that need them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moska.engine.sampling_params import SamplingParams
from moska.engine.transfer import to_device


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] float32 plus each row's logit_bias (in place when any)."""
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias:
            rows.append(i)
            cols.append(token)
            vals.append(bias)
    if not rows:
        return logits
    dev = logits.device
    index = (to_device(rows, dev, torch.int64), to_device(cols, dev, torch.int64))
    return logits.index_put_(index, to_device(vals, dev, torch.float32), accumulate=True)


def apply_processors(
    logits: torch.Tensor,  # [N, V] float32
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Each row through its request's logits processors, in order."""
    for i, p in enumerate(params):
        if not p.logits_processors:
            continue
        row = logits[i]
        history = list(output_token_ids[i])
        for proc in p.logits_processors:
            row = proc(history, row)
        if row.shape != logits[i].shape:
            raise ValueError(
                f"a logits processor returned shape {tuple(row.shape)}, expected "
                f"{tuple(logits[i].shape)}: return the row of logits it was given"
            )
        logits[i] = row
    return logits


def apply_penalties(
    logits: torch.Tensor,  # [N, V] float32
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """repetition_penalty over prompt + output tokens (vLLM/HF), then frequency and presence
    penalties over output tokens (OpenAI), for the rows that set any."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    sub = logits[to_device(rows, dev, torch.int64)]  # [R, V]
    out_counts = _counts([output_token_ids[i] for i in rows], vocab, dev)  # [R, V]
    rep = [params[i].repetition_penalty for i in rows]
    if any(r != 1.0 for r in rep):
        seen = out_counts > 0
        seen |= _counts([prompt_token_ids[i] for i in rows], vocab, dev) > 0
        r = to_device(rep, dev, torch.float32).unsqueeze(1)  # [R, 1]
        penalized = torch.where(sub > 0, sub / r, sub * r)
        sub = torch.where(seen, penalized, sub)
    freq = to_device([params[i].frequency_penalty for i in rows], dev, torch.float32)
    pres = to_device([params[i].presence_penalty for i in rows], dev, torch.float32)
    sub = sub - freq.unsqueeze(1) * out_counts - pres.unsqueeze(1) * (out_counts > 0).float()
    logits[to_device(rows, dev, torch.int64)] = sub
    return logits


def _counts(token_lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how many times each token occurs in each list."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)  # column V: padding
    if width == 0:
        return counts[:, :vocab]
    if any(t and min(t) < 0 for t in token_lists):  # on the host: no device sync
        raise RuntimeError("penalties read a negative token id; token ids are >= 0")
    padded = [list(t) + [vocab] * (width - len(t)) for t in token_lists]
    ids = to_device(padded, device, torch.int64)  # [R, width]
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]
