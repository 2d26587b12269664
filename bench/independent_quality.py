"""What position-independent libraries cost in quality, and which known fix pays it back.

Held-out files (the networkx and sympy sources in this venv; neither package was trained on)
are scored with a library made of their package's *other* files (their directory's siblings,
the modules a target imports first). Each target is the file's first ``--target-tokens``
tokens; its loss is the mean next-token loss (nats) of those tokens, the first excepted (the
same token set in every setting). Settings:

- ``none``: ``<eot> F`` alone.
- ``prefix``: ``<eot> A1 \\n A2 ...  F`` as one context (fits the model's context), all chunks
  and top-k.
- ``independent``: each chunk of ``--chunk-size`` tokens prefilled alone at positions
  0..len-1 (what ``moska library build --mode independent`` stores); the request's own tokens
  start at position ``chunk_size``. All chunks, top 25 % and top 12.5 %.
- fixes of independent mode: ``request_bos`` (the request starts with ``<eot>``: one attention
  sink; today's engine sends none after a library); ``chunk_sink`` (each chunk prefilled
  after an ``<eot>`` whose row is then dropped, so its tokens see the sink they were trained
  with, plus the request's ``<eot>``); APE's shared-part temperature ``T`` (logits of the
  library keys times 1/T) and scale ``S`` (the library part's LSE + log S in the merge).
- ``past context``: a library of ``--long-tokens`` (several times the model's context), only
  possible in independent mode.

Everything runs through moska's own code: ``build_in_memory`` prefills the libraries (the
builder the server uses), ``route`` (key-max, PyTorch reference) picks the chunks, and the
forward is ``CausalLM`` with an attention that does what ``attention/backend.py`` does:
the request's causal attention over its own tokens, attention over the routed chunks, and
an LSE merge (here as one masked dense product per layer, the same math as the grouped
kernel + merge, vectorized for CPU; ``bench/independent_scoring.py``). fp32, CPU. Fix
parameters are chosen on the even targets (dev) and reported on all and on the odd ones (test)
(``bench/independent_summary.py``); targets and their libraries: ``bench/independent_heldout.py``.

Usage: .venv/bin/python bench/independent_quality.py [--targets 4] [--out FILE]
       (--cpu-dry-run: 1 target per package, short texts; checks the pipeline in ~1 min)
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.independent_heldout import PACKAGES, library_docs, package_files, pick_targets, read_ids
from bench.independent_scoring import Shared, build, target_loss
from bench.independent_summary import mean_over, resummarize, summarize
from moska.model import load_model


def ceil_frac(c: int, frac: float) -> int:
    return max(1, math.ceil(c * frac))


def run_target(lm, tok, target: Path, files, args, grid) -> dict:
    bos = tok.bos_token_id
    f_ids = read_ids(tok, target)[: args.target_tokens]
    n = len(f_ids) - 1  # scored: f[1:]
    cs = args.chunk_size
    rows: dict[str, float] = {}

    def score(name, ids, start, shared):
        s, cnt = target_loss(lm, ids, start, n, shared)
        rows[name] = round(s / cnt, 4)

    score("none", [bos] + f_ids, 0, None)
    fit_docs = library_docs(tok, target, files, args.fit_tokens, args.per_doc)
    long_docs = library_docs(tok, target, files, args.long_tokens, args.per_doc)
    pre = build(lm, fit_docs, "prefix", cs)
    C = pre.num_chunks
    score("prefix/all", f_ids, pre.num_tokens, Shared(pre, C))
    score("prefix/top25%", f_ids, pre.num_tokens, Shared(pre, ceil_frac(C, 0.25)))
    info = {"target": "/".join(target.parts[-3:])}
    for tag, docs in (("fit", fit_docs), ("long", long_docs)):
        ind = build(lm, docs, "independent", cs)
        snk = build(lm, docs, "independent", cs, sink=True)
        C = ind.num_chunks
        info[f"{tag}_library_tokens"] = ind.num_tokens
        info[f"{tag}_chunks"] = C
        for frac, label in ((1.0, "all"), (0.25, "top25%"), (0.125, "top12.5%")):
            k = C if frac == 1.0 else ceil_frac(C, frac)
            score(f"{tag}/independent/{label}", f_ids, cs, Shared(ind, k))
            score(f"{tag}/independent+request_bos/{label}", [bos] + f_ids, cs, Shared(ind, k))
            score(f"{tag}/independent+chunk_sink/{label}", [bos] + f_ids, cs + 1, Shared(snk, k))
            for t, b in grid:
                score(f"{tag}/independent+chunk_sink+ape(T={t},logS={b})/{label}",
                      [bos] + f_ids, cs + 1, Shared(snk, k, t, b))  # fmt: skip
    info["target_tokens"] = len(f_ids)
    info["losses"] = rows
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--targets", type=int, default=2, help="held-out targets per package")
    ap.add_argument("--target-tokens", type=int, default=192)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--fit-tokens", type=int, default=1024, help="library that fits (prefix)")
    ap.add_argument("--long-tokens", type=int, default=4608, help="library past the context")
    ap.add_argument("--per-doc", type=int, default=512, help="tokens kept per library file")
    ap.add_argument(
        "--ape",
        nargs="+",
        default=["0.9,-0.5", "1.0,-0.5"],
        help="APE (temperature,log scale) pairs tried on chunk_sink libraries",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--resummarize", metavar="FILE", help="recompute FILE's summary, run nothing")
    ap.add_argument("--out", default=str(ROOT / "bench/results/independent_quality.json"))
    args = ap.parse_args()
    if args.resummarize:
        resummarize(args.resummarize)
        return
    if args.cpu_dry_run:
        args.targets, args.target_tokens, args.fit_tokens, args.long_tokens = 1, 96, 384, 768
        args.chunk_size, args.per_doc = 128, 256
        args.ape = ["0.9,-0.5"]
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    tok = lm.tokenizer
    ctx = lm.config.max_position_embeddings
    assert args.fit_tokens + args.target_tokens + 1 <= ctx, "the prefix library must fit"
    grid = [tuple(float(x) for x in pair.split(",")) for pair in args.ape]
    results = []
    for pkg in PACKAGES:
        files = package_files(pkg)
        for target in pick_targets(tok, files, args.targets, args.target_tokens + 1, args.seed):
            r = run_target(lm, tok, target, files, args, grid)
            r["package"] = pkg
            results.append(r)
            print(f"{r['target']}: " + ", ".join(
                f"{k}={v}" for k, v in r["losses"].items() if "ape" not in k), file=sys.stderr,
                flush=True)  # fmt: skip
    keys = list(results[0]["losses"])
    dev, test = results[0::2], results[1::2] or results
    table = {k: {"all": mean_over(results, k), "dev": mean_over(dev, k),
                 "test": mean_over(test, k)} for k in keys}  # fmt: skip
    summary = summarize(table, grid)
    print(f"{'setting':<64} {'all':>7} {'dev':>7} {'test':>7}")
    for k, v in table.items():
        print(f"{k:<64} {v['all']:>7.4f} {v['dev']:>7.4f} {v['test']:>7.4f}")
    print(json.dumps(summary, indent=1))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {
        "what": "loss (nats) of held-out files' tokens with a library of their package's other "
        "files: no library / prefix / position-independent, and independent mode's fixes",
        "model": Path(args.model).name,
        "model_context": ctx,
        "device": "cpu",
        "dtype": "float32",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git_commit": commit,
        "command": "python " + " ".join(sys.argv),
        "shapes": {
            k: getattr(args, k)
            for k in (
                "targets",
                "target_tokens",
                "chunk_size",
                "fit_tokens",
                "long_tokens",
                "per_doc",
            )
        },
        "summary": summary,
        "mean_loss": table,
        "per_target": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
