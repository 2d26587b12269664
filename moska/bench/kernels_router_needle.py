"""Needle test for the two-stage router's shortlist size, on chunks of hundreds of keys.

`python -m moska.bench.kernels_router_needle [--out FILE]` (CPU, PyTorch references, ~15 s).

Each trial plants one needle key in one chunk: in every KV head a key of typical norm along
the direction that head's first query head looks for; every other key is random in a
24-dim subspace of D = 128 (what a rank-32 PCA basis captures), the other query heads are
small noise. Reported: the share of requests whose top-k keeps the needle's chunk, for
key-max (per request and per KV head: no shortlist) and for two-stage with a bound
shortlist of f * top_k chunks. The Quest bound of a chunk of hundreds of keys is the sum
over D of the extremes of those keys, so it ranks chunks little better than chance: the
needle survives a shortlist of f * top_k of C chunks somewhat more often than f * top_k / C
(64 chunks of 256 keys, top-4: 0.26 at f = 1, 0.41 at f = 4, 0.61 at f = 8; key-max 1.0,
`bench/results/router_needle_cpu.json`); the unit test's needle
(tests/kernels/test_router.py: 16 chunks of 24-48 keys, shortlist = all chunks) cannot
see this. So no shortlist size short of all chunks keeps needles in long chunks: the
shortlist is a speed knob that costs answers, and key-max over every chunk stays the
default (docs/routing.md, "Routing cost").
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from moska.bench.common import environment, write_json
from moska.kernels.router import build_routing_index, route, selections_to_lists

FACTORS = (1, 2, 4, 8, 16)


def trial(seed: int, C: int, L: int, top_k: int, B: int = 16, Hkv: int = 2, G: int = 4,
          D: int = 128, sub_dim: int = 24) -> dict[str, float]:  # fmt: skip
    """Share of the B requests whose routed chunks keep the needle, per router."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(0, C * L + 1, L, dtype=torch.int32)
    sub = torch.linalg.qr(torch.randn(Hkv, D, sub_dim, generator=gen))[0]  # [Hkv, D, sub]
    z = torch.randn(C * L, Hkv, sub_dim, generator=gen)
    keys = torch.einsum("hdr,shr->shd", sub, z) + 0.05 * torch.randn(C * L, Hkv, D, generator=gen)
    q = 0.3 * torch.randn(B, Hkv * G, D, generator=gen)
    needle = int(torch.randint(0, C, (1,), generator=gen))
    row = needle * L + int(torch.randint(0, L, (1,), generator=gen))
    for h in range(Hkv):
        u = sub[h] @ torch.randn(sub_dim, generator=gen)
        u = u / u.norm()
        keys[row, h] = u * keys[:, h].norm(dim=-1).mean()
        q[:, h * G] = 3.0 * u + 0.3 * torch.randn(B, D, generator=gen)
    index = build_routing_index(keys.half(), offsets)
    routers = [("keymax", "keymax", 4, False), ("keymax_per_kv_head", "keymax", 4, True)]
    routers += [(f"two_stage_f{f}", "two_stage", f, False) for f in FACTORS if f * top_k < C]
    out = {}
    for name, scorer, factor, per_head in routers:
        sel = route(q.half(), index, top_k, scorer=scorer, shortlist_factor=factor,
                    per_kv_head=per_head, use_triton=False)  # fmt: skip
        out[name] = sum(needle in cs for cs in selections_to_lists(sel, B)) / B
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/router_needle_cpu.json")
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for C, L, top_k in ((64, 256, 4), (128, 128, 4)):
        trials = [trial(s, C, L, top_k) for s in range(args.seeds)]
        rates = {n: sum(t[n] for t in trials) / len(trials) for n in trials[0]}
        rows.append({"chunks": C, "chunk_len": L, "top_k": top_k, "kept": rates})
        print(json.dumps(rows[-1]), flush=True)
    summary = {
        f"c{r['chunks']}_l{r['chunk_len']}_{k}": v for r in rows for k, v in r["kept"].items()
    }
    payload = dict(environment(), device="cpu", dtype="float16 (references in fp32)",
                   shapes={"B": 16, "Hkv": 2, "G": 4, "D": 128, "key_subspace": 24},
                   seeds=args.seeds, rows=rows, summary=summary,
                   wall_s=time.time() - t0)  # fmt: skip
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
