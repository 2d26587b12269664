"""What MLKV sharing costs in quality, without training: token loss of moska-code-20m and its
`moska convert mlkv` variants (share 2 and 4, merge mean and first) on held-out code.

Held-out text: the networkx and sympy sources installed in this venv (neither package was in
the model's training set; see the model's README). Files are shuffled with a fixed seed,
each encoded with the model's tokenizer (which puts <|endoftext|> in front, as in training),
packed into one stream per package, and cut into non-overlapping windows of the training
length (2,048). The loss is the mean next-token cross-entropy (nats) over every position,
computed by moska's own model code (`CausalLM` with the dense reference attention) in fp32
on CPU. As a check of the pipeline the original's loss on the README's three spot files is
compared with the value in the model's eval.json.

Usage: .venv/bin/python bench/mlkv_quality.py [--windows 2] [--model DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.bench.common import environment
from moska.bench.heldout import PACKAGES, heldout_windows
from moska.model import DenseAttention, load_model
from moska.model.convert_mlkv import convert_mlkv


@torch.inference_mode()
def token_loss(model, ids: list[int]) -> tuple[float, int]:
    """(summed next-token loss in nats, tokens scored) of one sequence."""
    x = torch.tensor(ids)
    hidden = model(x, torch.arange(len(ids)), DenseAttention(model.config.sm_scale))
    logits = model.compute_logits(hidden[:-1])  # [T-1, V] fp32
    loss = F.cross_entropy(logits, x[1:], reduction="sum")
    return float(loss), len(ids) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--windows", type=int, default=2, help="windows per held-out package")
    ap.add_argument("--length", type=int, default=2048, help="tokens per window")
    ap.add_argument("--shares", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/mlkv_quality.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    src = Path(args.model)
    t0 = time.perf_counter()

    orig = load_model(src, dtype="float32")
    windows = heldout_windows(orig.tokenizer, args.length, args.windows, args.seed)
    spot = []
    eval_file = src / "eval.json"
    if eval_file.is_file():
        for s in json.loads(eval_file.read_text()).get("spot_files", []):
            ids = orig.tokenizer.encode(s["text"])
            total, n = token_loss(orig.model, ids)
            spot.append({"path": s["path"], "tokens": len(ids), "tokens_eval_json": s.get(
                "n_tokens_with_bos"), "loss": round(total / n, 4), "loss_eval_json": s["loss"]})  # fmt: skip

    variants = [("original", None, None, src)]
    with tempfile.TemporaryDirectory(prefix="mlkv-") as tmp:
        for share in args.shares:
            for merge in ("mean", "first"):
                out = Path(tmp) / f"share{share}-{merge}"
                convert_mlkv(src, out, share=share, merge=merge)
                variants.append((f"share {share}, {merge}", share, merge, out))
        rows = []
        for name, share, merge, path in variants:
            lm = orig if path == src else load_model(path, dtype="float32")
            per_pkg = {}
            tot, cnt = 0.0, 0
            for pkg, wins in windows.items():
                s = n = 0
                for w in wins:
                    ls, ln = token_loss(lm.model, w)
                    s, n = s + ls, n + ln
                per_pkg[pkg] = round(s / n, 4)
                tot, cnt = tot + s, cnt + n
            c = lm.config
            rows.append({
                "variant": name, "share": share, "merge": merge,
                "kv_layers": c.num_kv_layers, "layers": c.num_layers,
                "kv_bytes_per_token_bf16": c.kv_bytes_per_token(torch.bfloat16),
                "loss": round(tot / cnt, 4), "loss_by_package": per_pkg, "tokens": cnt,
            })  # fmt: skip
            print(f"  {name}: {tot / cnt:.4f}", file=sys.stderr, flush=True)
    base = rows[0]["loss"]
    for r in rows:
        r["delta_vs_original"] = round(r["loss"] - base, 4)

    head = f"{'variant':<16} {'KV layers':>9} {'KV B/token':>10} {'loss':>7} {'delta':>7}"
    head += "".join(f" {p:>9}" for p in PACKAGES)
    print(head)
    for r in rows:
        line = f"{r['variant']:<16} {r['kv_layers']:>9} {r['kv_bytes_per_token_bf16']:>10} "
        line += f"{r['loss']:>7.4f} {r['delta_vs_original']:>+7.4f}"
        line += "".join(f" {r['loss_by_package'][p]:>9.4f}" for p in PACKAGES)
        print(line)
    for s in spot:
        print(f"spot {s['path']}: loss {s['loss']} (eval.json {s['loss_eval_json']}), "
              f"{s['tokens']} tokens (eval.json {s['tokens_eval_json']})")  # fmt: skip
    result = {
        "environment": environment(),
        "model": src.name,
        "what": "token loss (nats) of MLKV variants made by `moska convert mlkv`, no training",
        "heldout": {p: f"{args.windows} windows x {args.length} tokens" for p in PACKAGES},
        "device": "cpu",
        "dtype": "float32",
        "rows": rows,
        "spot_check": spot,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
