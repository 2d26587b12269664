"""Helpers of the Helix library tests: a library's documents, prompts that span several KV
blocks, and one library forward or greedy run through an engine."""

from __future__ import annotations

import torch
from tp_support import greedy_library as shared_greedy_library
from tp_support import prefill_inputs

CHUNK = 16
_G = torch.Generator().manual_seed(11)
# 3 blocks of 16 (every KVP rank holds some of it), one block, one token
LIB_PROMPTS = [torch.randint(3, 256, (40,), generator=_G).tolist(), [40, 41, 42, 43, 44], [99]]
DOCS = [("a.txt", torch.randint(3, 256, (48,), generator=_G).tolist()),
        ("b.txt", torch.randint(3, 256, (48,), generator=_G).tolist())]  # fmt: skip  # 6 chunks


@torch.inference_mode()
def library_logits(engine, name: str, top_k: int, policy, reports=None) -> torch.Tensor:
    """Logits [T, V] fp32 of one prefill forward of LIB_PROMPTS after library `name` (every
    row reads it), through the engine's model and attention (blocks 0.. in order; idle).
    `reports` (a list): the group records its selections and coverage at layer 1 there."""
    from moska.attention.metadata import LibraryGroup

    lib = engine.libraries.acquire(name)
    try:
        runner = engine.runner
        ids, pos, meta = prefill_inputs(
            LIB_PROMPTS, engine.config.block_size, runner.device, lib.position_offset
        )
        rows = torch.arange(len(ids), device=runner.device)
        group = LibraryGroup(lib, rows, top_k, policy=policy, all_rows=True)
        if reports is not None:
            group.record, group.coverage_layers = True, frozenset({1})
        meta.groups.append(group)
        bound = runner.attention.bind(meta)
        hidden = runner.model(ids, pos, bound)
        if reports is not None:
            reports.extend(bound.routing)
        return runner.model.compute_logits(hidden)
    finally:
        engine.libraries.release(lib)


def greedy_library(engine, name: str, max_tokens: int, top_k: int | None) -> dict:
    """Greedy completions of LIB_PROMPTS reading library `name`, run together."""
    return shared_greedy_library(engine, LIB_PROMPTS, name, max_tokens, top_k)
