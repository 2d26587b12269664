"""What residency-biased routing (moska/library/tier_bias.py) costs in quality, and what it
saves in bytes: moska-code-20m continuing held-out code with a library in context.

Held-out windows as bench/fp8_quality.py (networkx and sympy sources, none in the model's
training set): each window's first `--lib-tokens` tokens are the library (prefix mode,
`--chunk-size` chunks: 3,072 / 64 = 48 chunks, the shape of moska/bench/tiers.py's library),
the rest is the query, each token routed alone as a decode row is (key-max scores summed
over KV heads, as `moska.kernels.router.route`). Per layer the resident set is the
`--resident` share of chunks the unbiased top-k routed to most over the window's query
tokens (an LFU cache's steady state for that stream; `--held-out-residency`: from the first
half of them, every figure scored on the second half). Rows, per top-k and eps: loss (nats
per token), its change against the unbiased top-k and against all chunks, top-1 agreement
with the unbiased top-k, the share of selections on resident chunks, and, per layer, the
distinct non-resident chunks that batches of `--batch` query tokens (every n-th token, as
concurrent decode rows) route to: the chunks a step would have to copy in. `summary` projects
each eps onto the H200 tiers benchmark: missing bytes per step = that share of the 24 GiB
library, floor ratio = t_resident / max(t_resident, missing / H2D) with the given inputs.

Usage: .venv/bin/python bench/tier_bias_quality.py [--windows 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fp8_quality import LibraryAttention
from mlkv_quality import PACKAGES, heldout_windows

from moska.bench.tier_floor import floor
from moska.kernels.router import build_routing_index, score_chunks
from moska.library.tier_bias import topk_biased
from moska.model import DenseAttention, load_model


class BiasedAttention(LibraryAttention):
    """LibraryAttention routed with the residency bias; records each layer's top-k."""

    def __init__(self, lib_k, lib_v, index, offsets, top_k, sm_scale, resident, eps):
        super().__init__(lib_k, lib_v, index, offsets, top_k, sm_scale)
        self.resident, self.eps = resident, eps  # per layer [C] bool (None: unbiased)
        self.chosen: dict[int, torch.Tensor] = {}  # layer -> [T, k]

    def visible(self, layer: int, q: torch.Tensor) -> torch.Tensor | None:
        c = self.offsets.numel() - 1
        if self.top_k >= c:
            return None
        idx = self.index[layer]
        scores = score_chunks(q.to(idx.basis.dtype), idx, "keymax", use_triton=False).sum(1)
        if self.resident is None:
            top = scores.topk(self.top_k, dim=-1).indices
        else:
            top = topk_biased(scores, self.resident[layer], self.eps, self.top_k)
        self.chosen[layer] = top
        t, hkv = q.shape[0], self.lib_k[layer].shape[1]
        chunks = torch.zeros(t, c, dtype=torch.bool)
        chunks[torch.arange(t)[:, None], top] = True
        return chunks.expand(hkv, t, c).repeat_interleave(self.offsets.diff().long(), dim=2)


@torch.inference_mode()
def run_window(model, ids, a, top_ks, eps_list):
    """{(top_k, eps): (logits [T-1, V], chosen per layer)}; eps None: unbiased."""
    cfg = model.config
    sm_scale = cfg.sm_scale or cfg.head_dim**-0.5
    lib, query = ids[: a.lib_tokens], ids[a.lib_tokens :]
    att = DenseAttention(cfg.sm_scale)
    model(torch.tensor(lib), torch.arange(a.lib_tokens), att)
    layers = sorted(att.k)
    offsets = torch.arange(0, a.lib_tokens + 1, a.chunk_size, dtype=torch.int32)
    lk = [att.k[i].to(torch.bfloat16).float() for i in layers]  # a bf16 model's pools
    lv = [att.v[i].to(torch.bfloat16).float() for i in layers]
    index = [build_routing_index(k.to(torch.bfloat16), offsets) for k in lk]
    c = offsets.numel() - 1
    x, pos = torch.tensor(query), torch.arange(a.lib_tokens, a.lib_tokens + len(query))
    out = {}
    for top_k in top_ks:
        runs = [None] if top_k >= c else [None, *eps_list]
        resident = None
        for eps in runs:
            la = BiasedAttention(lk, lv, index, offsets, top_k, sm_scale, resident, eps)
            hidden = model(x, pos, la)
            out[(top_k, eps)] = (model.compute_logits(hidden[:-1]).float(), la.chosen)
            if eps is None and top_k < c:  # the LFU steady state of the unbiased stream
                n_res = max(1, round(a.resident * c))
                resident = []
                for layer in range(len(layers)):
                    seen = la.chosen[layer][: a.calib]  # --held-out-residency: first half
                    counts = torch.bincount(seen.flatten(), minlength=c)
                    mask = torch.zeros(c, dtype=torch.bool)
                    mask[counts.argsort(descending=True, stable=True)[:n_res]] = True
                    resident.append(mask)
                out[(top_k, "resident")] = resident
    return out, x[1:]


def demand(chosen, resident, batch: int) -> tuple[float, float]:
    """(share of selections on resident chunks, distinct non-resident chunks per layer per
    batch of `batch` rows (every n-th token, n = T // batch, as concurrent decode rows))."""
    on = tot = 0
    distinct = []
    for layer, top in chosen.items():
        res = resident[layer][top]
        on += int(res.sum())
        tot += res.numel()
        stride = max(1, top.shape[0] // batch)
        for start in range(stride):
            rows = top[start::stride][:batch]
            miss = rows[~resident[layer][rows]]
            distinct.append(len(torch.unique(miss)))
    return on / max(1, tot), sum(distinct) / max(1, len(distinct))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--windows", type=int, default=2, help="windows per held-out package")
    ap.add_argument("--lib-tokens", type=int, default=3072)
    ap.add_argument("--query-tokens", type=int, default=768)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--top-ks", default="4,8")
    ap.add_argument("--eps", default="0.25,0.5,1,inf", help="bias, in score std units")
    ap.add_argument("--resident", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=256, help="rows per step for the demand")
    ap.add_argument("--t-resident-s", type=float, default=256 / 12022.36,
                    help="H200 all-resident step (bench/results/tiers_h200.json, zipf1.0)")  # fmt: skip
    ap.add_argument("--h2d-gib-s", type=float, default=18.0 / (6.8632 / 12),
                    help="H2D GiB/s (default: what tiers_h200.json's lfu-wait moved)")  # fmt: skip
    ap.add_argument(
        "--held-out-residency",
        action="store_true",
        help="the resident set from the first half of each window's query tokens, "
        "everything scored on the second half (default: from and on all of them)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/tier_bias_quality.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.calib = a.query_tokens // 2 if a.held_out_residency else a.query_tokens
    t0 = time.perf_counter()
    lm = load_model(a.model, dtype="float32")
    windows = heldout_windows(lm.tokenizer, a.lib_tokens + a.query_tokens, a.windows, a.seed)
    c = a.lib_tokens // a.chunk_size
    top_ks = [c, *(int(k) for k in a.top_ks.split(","))]
    eps_list = [float(e) for e in a.eps.split(",")]
    loss: dict = {}
    agree: dict = {}
    hit: dict = {}
    distinct: dict = {}
    count = 0
    for pkg in PACKAGES:
        for w in windows[pkg]:
            out, target = run_window(lm.model, w, a, top_ks, eps_list)
            skip = a.calib if a.held_out_residency else 0  # score only the other half
            target = target[skip:]
            count += target.numel()
            for key, val in out.items():
                if key[1] == "resident":
                    continue
                lg, chosen = val
                lg = lg[skip:]
                chosen = {layer: top[skip:] for layer, top in chosen.items()}
                loss[key] = loss.get(key, 0.0) + float(F.cross_entropy(lg, target, reduction="sum"))
                ref = out[(key[0], None)][0][skip:].argmax(-1)
                agree[key] = agree.get(key, 0) + int((lg.argmax(-1) == ref).sum())
                if key[0] < c:
                    h, d = demand(chosen, out[(key[0], "resident")], a.batch)
                    hit.setdefault(key, []).append(h)
                    distinct.setdefault(key, []).append(d)
            print(f"  {pkg} window done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    all_loss = loss[(c, None)] / count
    lib_gib = 24.0  # tiers_h200.json's library: 48 x 4,096 tokens at 8B dims
    rows = []
    for (k, eps), total in loss.items():
        base = loss[(k, None)] / count
        r = {"routing": "all chunks" if k >= c else f"top-{k}",
             "eps": None if eps is None else ("inf" if math.isinf(eps) else eps),
             "loss": round(total / count, 5),
             "loss_rel_vs_unbiased": round(total / count / base - 1, 5),
             "loss_rel_vs_all_chunks": round(total / count / all_loss - 1, 5),
             "top1_agreement_vs_unbiased": round(agree[(k, eps)] / count, 5)}  # fmt: skip
        if k < c:
            d = sum(distinct[(k, eps)]) / len(distinct[(k, eps)])
            miss = d / c * lib_gib * 2**30
            r.update(
                resident_selection_share=round(sum(hit[(k, eps)]) / len(hit[(k, eps)]), 4),
                nonresident_chunks_per_step=round(d, 2),
                projected_gib_per_step=round(miss / 2**30, 2),
                projected_floor_ratio=round(floor(a.t_resident_s, miss, a.h2d_gib_s * 2**30), 3),
            )
        rows.append(r)
    for r in rows:
        print(r)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    ok = [r for r in rows if r["eps"] is not None and abs(r["loss_rel_vs_unbiased"]) <= 0.01]
    result = {
        "what": "residency-biased routing on moska-code-20m: loss vs bytes a tiered step misses",
        "command": "python " + " ".join(sys.argv),
        "model": Path(a.model).name,
        "heldout": {p: f"{a.windows} windows" for p in PACKAGES},
        "library_tokens": a.lib_tokens,
        "chunk_size": a.chunk_size,
        "num_chunks": c,
        "resident_share": a.resident,
        "resident_set_from": "first half of the query tokens, scored on the second"
        if a.held_out_residency
        else "all query tokens (the LFU steady state of the scored stream)",
        "batch_rows": a.batch,
        "query_tokens_scored": count,
        "device": "cpu",
        "compute_dtype": "float32 (library KV rounded to bf16)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git_commit": commit,
        "projection_inputs": {
            "t_resident_s": a.t_resident_s,
            "h2d_gib_s": a.h2d_gib_s,
            "library_gib": lib_gib,
        },
        "rows": rows,
        "summary": {
            "all_chunks_loss": round(all_loss, 5),
            "within_1pct_of_unbiased": [
                {
                    k: r[k]
                    for k in ("routing", "eps", "loss_rel_vs_unbiased", "projected_floor_ratio")
                }
                for r in ok
            ],
            "note": "resident set: the LFU steady state of the same query stream; query "
            "tokens of one window stand in for concurrent rows (more alike than requests)",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
