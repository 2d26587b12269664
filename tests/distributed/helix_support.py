"""Helpers of the Helix library tests: a library's documents, prompts that span several KV
blocks, and one library forward or greedy run through an engine."""

from __future__ import annotations

import torch

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
    from moska.attention.metadata import AttentionMetadata, LibraryGroup

    lib = engine.libraries.acquire(name)
    try:
        runner, bs, dev = engine.runner, engine.config.block_size, engine.runner.device
        ids, pos, slots, cu, lens, tables, block = [], [], [], [0], [], [], 0
        width = max(-(-len(p) // bs) for p in LIB_PROMPTS)
        for p in LIB_PROMPTS:
            n = -(-len(p) // bs)
            table = list(range(block, block + n))
            block += n
            ids += p
            pos += range(lib.position_offset, lib.position_offset + len(p))
            slots += [table[i // bs] * bs + i % bs for i in range(len(p))]
            cu.append(len(ids))
            lens.append(len(p))
            tables.append(table + [0] * (width - n))

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=dev)

        meta = AttentionMetadata(
            t(slots, torch.int64), t(cu, torch.int32), t(lens, torch.int32),
            t(tables, torch.int32), decode_only=False,
        )  # fmt: skip
        rows = torch.arange(len(ids), device=dev)
        group = LibraryGroup(lib, rows, top_k, policy=policy, all_rows=True)
        if reports is not None:
            group.record, group.coverage_layers = True, frozenset({1})
        meta.groups.append(group)
        bound = runner.attention.bind(meta)
        hidden = runner.model(t(ids, torch.int64), t(pos, torch.int64), bound)
        if reports is not None:
            reports.extend(bound.routing)
        return runner.model.compute_logits(hidden)
    finally:
        engine.libraries.release(lib)


def greedy_library(engine, name: str, max_tokens: int, top_k: int | None) -> dict:
    """Greedy completions of LIB_PROMPTS reading library `name`, run together."""
    from moska.engine.sampling_params import SamplingParams

    for i, p in enumerate(LIB_PROMPTS):
        params = SamplingParams(max_tokens=max_tokens + i, temperature=0.0, ignore_eos=True)
        engine.add_request(f"lib{i}", p, params, library=name, top_k_chunks=top_k)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out
