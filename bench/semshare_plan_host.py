"""SemShareKV's plan: the host-side pieces that are the same work on a GPU machine, old vs
new in one run (session 16's cut of the plan's host time).

On a GPU the plan's device work (features, LSH codes, the [N, F] x [F, M] matching) is a few
launches; what stays on the host is numpy and Python: the prompt's ids made a tensor, the
LSH votes over the index's runs, and the exact LSH share of each shortlisted reference. These
are timed here on the CPU with a tiny embedding (so torch compute is negligible and the
pieces are the host work the H200 run does too), a 5,120-token prompt and `--refs` stored
references of 5,120 tokens:

- ids: `torch.tensor(list)` (old) vs `torch.from_numpy(np.fromiter(...))` (new)
- shares: `_share_in` per shortlisted reference, an unsorted binary search (old) vs
  `SortedQueries` (one sort of the prompt's signatures, then a sorted search per reference)
- candidates: the whole `LSHIndex.candidates` (new), signatures and votes included

Usage: .venv/bin/python bench/semshare_plan_host.py [--refs 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.bench.common import environment
from moska.semshare import lsh as lsh_mod
from moska.semshare.lsh import LSHIndex, SortedQueries, _share_in
from moska.semshare.matching import inverse_norms, token_features


class _Unsorted:
    """The old scoring: an unsorted binary search of every signature per reference."""

    def __init__(self, sigs: np.ndarray) -> None:
        self.sigs = sigs

    def share_in(self, keys: np.ndarray) -> float:
        return _share_in(self.sigs, keys)


def timed(fn, repeats: int) -> dict:
    """min and median ms of `repeats` calls (min: the least disturbed on a shared box)."""
    xs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        xs.append(1000 * (time.perf_counter() - t))
    return {"min_ms": round(min(xs), 3), "median_ms": round(statistics.median(xs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=5120)
    ap.add_argument("--refs", type=int, default=4, help="stored references (the shortlist: 4)")
    ap.add_argument("--hidden", type=int, default=32, help="tiny: host work, not compute")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench/results/semshare_plan_host_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n, vocab = args.prompt, 32000
    embed = torch.randn(vocab, args.hidden, generator=gen)
    inv = inverse_norms(embed)
    lsh = LSHIndex(2 * args.hidden)
    refs = [torch.randint(0, 2000, (n,), generator=gen) for _ in range(args.refs)]
    for i, ids in enumerate(refs):
        lsh.add(i, token_features(embed, ids, inv_norm=inv))
    new = refs[-1].clone()
    new[::5] = torch.randint(0, 2000, (len(new[::5]),), generator=gen)  # a fifth edited
    feats = token_features(embed, new, inv_norm=inv)
    rows = torch.linspace(0, n - 1, 1024).round().long()
    sigs = lsh.signatures(feats[rows]).numpy()
    keys = [lsh._keys[i] for i in range(args.refs)]
    new_list = new.tolist()
    q = SortedQueries(sigs)
    assert [q.share_in(k) for k in keys] == [_share_in(sigs, k) for k in keys]
    r = args.repeats
    rows_out = {
        "ids_old": timed(lambda: torch.tensor(new_list, dtype=torch.int64), r),
        "ids_new": timed(lambda: torch.from_numpy(np.fromiter(new_list, np.int64, n)), r),
        "shares_old": timed(lambda: [_share_in(sigs, k) for k in keys], r),
        "shares_new": timed(lambda: [SortedQueries(sigs).share_in(k) for k in keys], r),
        "candidates_new": timed(lambda: lsh.candidates(feats, top=1), r),
    }
    lsh_mod.SortedQueries = _Unsorted  # type: ignore[misc,assignment]
    try:  # the whole lookup as before: the shortlist scored by `_share_in`
        rows_out["candidates_old"] = timed(lambda: lsh.candidates(feats, top=1), r)
    finally:
        lsh_mod.SortedQueries = SortedQueries  # type: ignore[misc]
    summary = {
        k: rows_out[f"{k}_old"]["min_ms"] - rows_out[f"{k}_new"]["min_ms"]
        for k in ("ids", "shares", "candidates")
    }
    out = {
        "bench": "semshare_plan_host",
        "env": environment(),
        "command": " ".join(sys.argv),
        "device": "cpu",
        "shapes": {"prompt": n, "refs": args.refs, "hidden": args.hidden, "sampled": 1024},
        "rows": rows_out,
        "summary": {"saved_min_ms": {k: round(v, 3) for k, v in summary.items()}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["rows"], indent=1), json.dumps(out["summary"]))


if __name__ == "__main__":
    main()
