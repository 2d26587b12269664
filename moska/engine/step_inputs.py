"""One scheduler decision flattened into the host lists a step's forward reads: every
scheduled request's new tokens packed into rows (token ids, positions after its library's
offset, KV slots), the per-request lengths and block tables, the rows that sample, the rows
of each library build with its top-k and routing policy, and the rows whose input token is
still in flight (read on the device from the previous step's tokens). Plain Python: the
runner (`engine/runner.py`) turns it into tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moska.engine import prompt_logprobs
from moska.engine.request import Request


@dataclass
class StepInputs:
    token_ids: list[int] = field(default_factory=list)  # [T]; 0 in rows of `pending`
    positions: list[int] = field(default_factory=list)  # [T], library offset included
    slots: list[int] = field(default_factory=list)  # [T] block * block_size + offset
    cu_q: list[int] = field(default_factory=lambda: [0])  # [B+1]
    seq_lens: list[int] = field(default_factory=list)  # [B] unique-KV tokens after the step
    tables: list[list[int]] = field(default_factory=list)  # [B, max_blocks], 0-padded
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    sample_reqs: list[Request] = field(default_factory=list)  # their requests, same order
    libs: dict[str, Any] = field(default_factory=dict)  # build id -> library (or composition)
    lib_rows: dict[str, list[int]] = field(default_factory=dict)  # build id -> its rows
    lib_topk: dict[str, int] = field(default_factory=dict)  # build id -> the largest top-k
    lib_policy: dict[str, Any] = field(default_factory=dict)  # build id -> RoutingPolicy
    # build id -> (request, sampled row) of the requests that sample this step
    record_reqs: dict[str, list[tuple[Request, int]]] = field(default_factory=dict)
    pending: list[tuple[int, str]] = field(default_factory=list)  # (row, id): input in flight
    prompt_rows: list[prompt_logprobs.PromptRows] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        """Every request computes one token this step."""
        return len(self.token_ids) == len(self.seq_lens)


def flatten_step(
    scheduled: Sequence[Any],  # [ScheduledRequest(request, num_new_tokens)]
    block_table: Callable[[str], list[int]],  # request id -> its KV blocks
    block_size: int,
    top_k_default: int,
    policy_of: Callable[[Request], Any],  # request -> its RoutingPolicy
) -> StepInputs:
    """The step's host inputs. Each request reads the library build it holds
    (``request.library``); a build's policy is its first request's."""
    bs = block_size
    x = StepInputs()
    for item in scheduled:
        req: Request = item.request
        start, n = req.num_computed_tokens, item.num_new_tokens
        end = start + n
        assert 0 < n and end <= req.num_tokens
        offset = 0
        lib = req.library
        if lib is not None:
            bid = lib.build_id
            x.libs[bid] = lib
            offset = lib.position_offset
            first = len(x.token_ids)
            x.lib_rows.setdefault(bid, []).extend(range(first, first + n))
            k = req.top_k_chunks or top_k_default
            x.lib_topk[bid] = max(x.lib_topk.get(bid, 0), k)
            if bid not in x.lib_policy:
                x.lib_policy[bid] = policy_of(req)
        rows = prompt_logprobs.rows_of(
            req.request_id, req.prompt_token_ids, start, end, len(x.token_ids),
            req.sampling_params.prompt_logprobs,
        )  # fmt: skip
        if rows is not None:
            x.prompt_rows.append(rows)
        x.token_ids.extend(req.token_ids_slice(start, min(end, req.num_known_tokens)))
        if end > req.num_known_tokens:  # its last input is prev's token, on the device
            assert end == req.num_known_tokens + 1, req.request_id  # one step in flight
            x.pending.append((len(x.token_ids), req.request_id))
            x.token_ids.append(0)  # overwritten on the device (ModelRunner._device_inputs)
        x.positions.extend(range(offset + start, offset + end))
        table = block_table(req.request_id)
        x.slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
        x.cu_q.append(len(x.token_ids))
        x.seq_lens.append(end)
        if end == req.num_tokens:
            x.sample_rows.append(len(x.token_ids) - 1)
            x.sample_reqs.append(req)
            if lib is not None:
                x.record_reqs.setdefault(lib.build_id, []).append((req, len(x.token_ids) - 1))
    max_blocks = max((s + bs - 1) // bs for s in x.seq_lens)
    for item in scheduled:
        table = block_table(item.request.request_id)
        x.tables.append(table[:max_blocks] + [0] * (max_blocks - len(table)))
    return x
