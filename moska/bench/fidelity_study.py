"""Where routing loses retrieval answers: a CPU study on the retrieval model.

Builds one prefix library per question once, then asks every question under each variant
at 12.5 / 25 / 50% of the chunks kept. Besides the named policies of moska.bench.fidelity,
two variants that no policy field expresses are studied by wrapping the router:
``layerN`` (only layer N routed, the others read every chunk) and ``decode_only`` (the
question's prompt rows read every chunk, the answer's decode rows are routed).

``--triton routing attention`` swaps the Triton kernels in after the libraries are built
(on CPU with TRITON_INTERPRET=1: the GPU's code paths, slowly). The default policy's name in
``--variants`` is ``default``; ``layer2:default`` routes only layer 2 with it.

Usage: python -m moska.bench.fidelity_study --retrieval-model .models/retrieval-4k \
    --variants default layer0:default decode_only:default
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import moska.routing as routing_pkg
from moska.bench.common import environment, write_json
from moska.bench.fidelity import policies
from moska.bench.fidelity_eval import answers_accuracy, k_for
from moska.routing import RoutingPolicy
from moska.routing.select import all_chunks

_real_select = routing_pkg.select_chunks
_RULES: dict[int, dict] = {}  # id(policy) -> {"layers": set | None, "decode_only": bool}


def _select(q, library, layer, top_k, policy, sm_scale, **kw):
    rule = _RULES.get(id(policy))
    if rule is not None:
        dense = rule["layers"] is not None and layer not in rule["layers"]
        # each question has its own library: a group of more than one row is a prompt
        dense = dense or (rule["decode_only"] and q.shape[0] > 1)
        if dense:
            hkv = library.routing[layer].num_kv_heads
            return all_chunks(q.shape[0], hkv, library.num_chunks, q.device, kw["use_triton"])
    return _real_select(q, library, layer, top_k, policy, sm_scale, **kw)


def _use_triton(engine, parts: list[str]) -> None:
    import dataclasses

    from moska.kernels import merge, shared_attention

    runner = engine.runner
    changes: dict = {}
    if "routing" in parts:
        changes["triton_routing"] = True
    if "attention" in parts:
        changes["grouped_shared"] = shared_attention.grouped_shared_attention
        changes["merge_selections"] = merge.merge_selections
    if changes:
        runner.ops = runner.attention.ops = dataclasses.replace(runner.ops, **changes)


def variants(names: list[str]) -> dict[str, RoutingPolicy]:
    base = policies(True)
    out = {}
    for name in names:
        head, _, rest = name.partition(":")  # e.g. "layer2:default", "decode_only:default"
        if not rest:
            out[name] = base[name]
            continue
        pol = base[rest].replace()  # a fresh object: rules are keyed by identity
        if head.startswith("layer"):
            _RULES[id(pol)] = {"layers": {int(head[5:])}, "decode_only": False}
        elif head == "decode_only":
            _RULES[id(pol)] = {"layers": None, "decode_only": True}
        else:
            raise SystemExit(f"unknown variant {head!r}")
        out[name] = pol
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moska.bench.fidelity_study")
    ap.add_argument("--retrieval-model", required=True)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--routing-rank", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--triton",
        nargs="*",
        default=[],
        choices=["routing", "attention"],
        help="after the builds, run these parts with the Triton kernels "
        "(CPU: set TRITON_INTERPRET=1): the GPU's code paths on CPU",
    )
    ap.add_argument("--out", default="bench/results/fidelity_study.json")
    args = ap.parse_args(argv)
    from moska.bench.retrieval_tasks import RetrievalSpec, make_examples
    from moska.engine.llm_engine import LLMEngine

    routing_pkg.select_chunks = _select  # attention/shared.py imports it at call time
    spec = RetrievalSpec.load(Path(args.retrieval_model))
    examples = make_examples(spec, args.questions, seed=10_000 + args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moska-study-") as root:
        engine = LLMEngine.from_model(
            args.retrieval_model, device=args.device, dtype=args.dtype, library_root=root,
            enable_prefix_caching=False, max_num_batched_tokens=8192,
        )  # fmt: skip
        pols = variants(args.variants)
        libs = []
        for i, ex in enumerate(examples):
            info = engine.libraries.build(
                f"st-{i}", [("ctx", ex.context)], chunk_size=args.chunk_size, mode="prefix",
                routing_rank=args.routing_rank,
            )  # fmt: skip
            libs.append((f"st-{i}", info.num_chunks, ex))
        C = max(c for _, c, _ in libs)
        _use_triton(engine, args.triton)
        for name, pol in pols.items():
            for f in args.fractions:
                k = k_for(f, C)
                t0 = time.perf_counter()
                items: list[tuple[list[int], list[int], str | None, int | None]] = [
                    (ex.question, ex.answer, lib, min(k, c)) for lib, c, ex in libs
                ]
                m = answers_accuracy(engine, items, pol)
                rows.append({"variant": name, "fraction": f, "k": k, "accuracy": m.value,
                             "coverage": m.coverage, "n": m.n,
                             "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
                print(f"{name:>28} k={k:>2} ({f}): {m.value:.3f} cov {m.coverage}", flush=True)
    summary: dict = {}
    for r in rows:
        summary.setdefault(r["variant"], {})[str(r["fraction"])] = round(r["accuracy"], 4)
    write_json(args.out, {
        "env": environment(["moska.bench.fidelity_study", *(argv or [])]),
        "args": vars(args), "chunks": C, "rows": rows, "summary": summary,
        "note": "dense is not re-measured here (1.0 in fidelity_retrieval_h200.json)",
    })  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
