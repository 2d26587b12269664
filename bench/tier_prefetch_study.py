"""What can a tiered library prefetch? Routing predictability on a trained model (CPU).

A position-independent library of networkx source files (held out of the model's
training) is built with moska-code-20m; requests are other networkx files: a prompt of
their first `--prompt` tokens, then `--gen` greedy decode steps through the real engine,
routed top-k. Each decode step and layer the routed chunk set S(l, t) is recorded (the
backend's shared-attention call is wrapped), with the query rows of the early layers.
Reported, as the share of S(l, t) that a predictor named in advance:
- stability / (a) previous step: S(l, t-1);
- (b) the layer below: S(l-1, t) (the fetch for layer l starts while layer l-1 runs);
- (c) an early layer's query: route layer l's index with the query of layer e (0 or 1)
  at the same step, top-k (the whole step's fetch could start after layer e);
- (a or b): S(l, t-1) | S(l-1, t) (twice the transfers).

    .venv/bin/python bench/tier_prefetch_study.py --out bench/results/tier_prefetch_study.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from moska import LLM, SamplingParams
from moska.bench.common import environment

MAX_FILE_BYTES = 200_000


def networkx_files(seed: int) -> list[Path]:
    spec = importlib.util.find_spec("networkx")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("networkx is not installed in this venv: it is the held-out text")
    base = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(
        p
        for p in base.rglob("*.py")
        if 2_000 <= p.stat().st_size <= MAX_FILE_BYTES and "tests" not in p.parts
    )
    random.Random(seed).shuffle(files)
    return files


class Recorder:
    """Wraps the backend's shared attention: per decode step, layer -> chunk set, and the
    query rows of the early layers."""

    def __init__(self, early: tuple[int, ...]) -> None:
        self.early = early
        self.steps: list[dict] = []  # {"sets": {layer: set}, "q": {layer: q_rows}}
        self._cur: dict | None = None

    def wrap(self, fn):
        def wrapped(ops, layer, q_rows, group, sm_scale, *a, **kw):
            o, lse, sel = fn(ops, layer, q_rows, group, sm_scale, *a, **kw)
            if q_rows.shape[0] == 1:  # a decode row (one request per step)
                if layer == 0:
                    self._cur = {"sets": {}, "q": {}, "group": group}
                    self.steps.append(self._cur)
                self._cur["sets"][layer] = set(sel.chunk.tolist())
                if layer in self.early:
                    self._cur["q"][layer] = q_rows.clone()
            return o, lse, sel

        return wrapped


def share(actual: set, predicted: set) -> float:
    return len(actual & predicted) / max(1, len(actual))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--chunks", type=int, default=96)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--early", default="0,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    early = tuple(int(x) for x in a.early.split(","))
    torch.manual_seed(a.seed)
    root = Path(tempfile.mkdtemp(prefix="prefetch-study-"))
    llm = LLM(a.model, device="cpu", dtype="float32", attention="torch", library_root=str(root),
              num_kv_blocks=256, max_model_len=1024, enable_prefix_caching=False)  # fmt: skip
    tok = llm.engine.tokenizer
    files = networkx_files(a.seed)
    docs, used, need = [], 0, a.chunks * a.chunk_size
    i = 0
    while used < need and i < len(files):
        text = files[i].read_text(errors="replace")
        n = len(tok.encode(text))
        docs.append((files[i].name, text))
        used += n
        i += 1
    queries = [f.read_text(errors="replace") for f in files[i : i + a.requests]]
    llm.engine.libraries.build("nx", docs, chunk_size=a.chunk_size, mode="independent")
    lib = llm.engine.libraries.get("nx")
    print(
        f"library: {lib.num_chunks} chunks of {a.chunk_size}, {lib.num_tokens} tokens", flush=True
    )

    from moska.attention import backend

    rec = Recorder(early)
    real = backend.shared_attention_for_group
    backend.shared_attention_for_group = rec.wrap(real)
    per_request = []
    try:
        params = SamplingParams(temperature=0, max_tokens=a.gen, ignore_eos=True)
        for text in queries:
            ids = tok.encode(text)[: a.prompt]
            start = len(rec.steps)
            llm.generate([ids], params, library="nx", top_k_chunks=a.top_k)
            per_request.append(rec.steps[start:])
    finally:
        backend.shared_attention_for_group = real

    from moska.routing import RoutingPolicy, select_chunks

    num_layers = lib.num_kv_layers
    acc = {k: [] for k in ("prev_step", "prev_layer", "prev_step_or_layer")}
    acc.update({f"early_layer_{e}": [] for e in early})
    by_layer = {k: [[] for _ in range(num_layers)] for k in acc}
    sm_scale = llm.engine.loaded.config.sm_scale
    for steps in per_request:
        for t, st in enumerate(steps):
            group = st["group"]
            policy = group.policy or RoutingPolicy(scorer=group.scorer)
            for layer in range(num_layers):
                actual = st["sets"].get(layer)
                if not actual:
                    continue
                preds = {}
                if t > 0 and layer in steps[t - 1]["sets"]:
                    preds["prev_step"] = steps[t - 1]["sets"][layer]
                if layer > 0:
                    preds["prev_layer"] = st["sets"][layer - 1]
                if "prev_step" in preds and "prev_layer" in preds:
                    preds["prev_step_or_layer"] = preds["prev_step"] | preds["prev_layer"]
                for e in early:
                    if layer > e and e in st["q"]:
                        sel = select_chunks(st["q"][e], lib, layer, a.top_k, policy, sm_scale,
                                            use_triton=False)  # fmt: skip
                        preds[f"early_layer_{e}"] = set(sel.chunk.tolist())
                for k, p in preds.items():
                    h = share(actual, p)
                    acc[k].append(h)
                    by_layer[k][layer].append(h)

    def mean(x):
        return sum(x) / len(x) if x else None

    summary = {k: mean(v) for k, v in acc.items()}
    summary["best_single_predictor"] = max(
        (k for k in acc if k != "prev_step_or_layer" and acc[k]), key=lambda k: summary[k]
    )
    result = {
        "benchmark": "tier_prefetch_study",
        "command": "python bench/tier_prefetch_study.py " + " ".join(sys.argv[1:]),
        "model": Path(a.model).name,
        "library": {
            "package": "networkx",
            "mode": "independent",
            "chunks": lib.num_chunks,
            "chunk_size": a.chunk_size,
            "tokens": lib.num_tokens,
        },
        "workload": {
            "requests": len(per_request),
            "prompt_tokens": a.prompt,
            "decode_steps": a.gen,
            "top_k": a.top_k,
            "layers": num_layers,
        },
        "environment": environment(),
        "seconds": time.time() - t0,
        "hit_rate_by_layer": {k: [mean(v) for v in rows] for k, rows in by_layer.items()},
        "samples": {k: len(v) for k, v in acc.items()},
        "summary": summary,
    }
    print(json.dumps(result["summary"], indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
