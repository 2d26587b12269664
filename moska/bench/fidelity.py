"""moska bench fidelity: does sparse routing keep answers? Measured through the real engine
and library path (libraries built by the LibraryManager, requests through LLMEngine).

Two signals:
- code (``--code-model``, moska-code-20m): loss of held-out files (networkx, sympy) read
  after a library of other files from the same folder: no library (the floor of what the
  library can add), every chunk (exact), and each routing policy at 12.5 / 25 / 50% of the
  chunks kept. ``recovered`` = (no-library loss - loss) / (no-library loss - all-chunks
  loss): the share of what the library gives that routing keeps.
- retrieval (``--retrieval-model``, trained by moska.bench.train_retrieval): exact-match
  accuracy of greedy answers to questions about facts spread over a long context; refused
  (no numbers reported) when the model's dense accuracy is under ``--min-dense``.

Both: prefix and independent libraries, several chunk sizes, mean coverage (the share of
the library's attention mass the routed chunks held, engine's routing report: mean over
three layers, each request's last prompt row). ``--study`` adds the policy variants of
docs/routing.md. JSON (and a plot with matplotlib) in bench/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moska.bench.common import environment, write_json
from moska.bench.fidelity_eval import answer_accuracy, answers_accuracy, k_for, sequence_loss
from moska.bench.fidelity_repkeys import REP_POLICIES, rep_policies
from moska.bench.fidelity_variants import VARIANTS, variant_policies
from moska.routing import LEGACY, ORACLE, RoutingPolicy

FRACTIONS = (0.125, 0.25, 0.5)


def policies(study: bool) -> dict[str, RoutingPolicy]:
    """Named policies: the new default, the old router with each scorer, the study's variants."""
    out = {"default": RoutingPolicy()}
    for s in ("keymax", "two_stage", "mean", "bound", ORACLE):
        out[f"legacy-{s}"] = LEGACY.replace(scorer=s)
    if study:
        out.update(
            {
                "per_kv_head": LEGACY.replace(per_kv_head=True),
                "dense1": LEGACY.replace(dense_layers=1),
                "dense2": LEGACY.replace(dense_layers=2),
                "first": LEGACY.replace(always_first=True),
                "last": LEGACY.replace(always_last=True),
                "first+last": LEGACY.replace(always_first=True, always_last=True),
                "adaptive0.9": LEGACY.replace(mass_threshold=0.9),
                "pages64": LEGACY.replace(page_size=64),
                "default+per_kv_head": RoutingPolicy(per_kv_head=True),
                "default+pages64": RoutingPolicy(page_size=64),
                "default+pages16": RoutingPolicy(page_size=16),
                "default+adaptive0.95": RoutingPolicy(mass_threshold=0.95),
                "default-oracle": RoutingPolicy(scorer=ORACLE),
                "per_kv_head+first": LEGACY.replace(per_kv_head=True, always_first=True),
                "per_kv_head+adaptive0.95": LEGACY.replace(per_kv_head=True, mass_threshold=0.95),
                "per_kv_head+pages64": LEGACY.replace(per_kv_head=True, page_size=64),
                "per_kv_head+dense1": LEGACY.replace(per_kv_head=True, dense_layers=1),
                "per_kv_head+two_stage": LEGACY.replace(per_kv_head=True, scorer="two_stage"),
                # key-max on each KV head's own bound shortlist (session 16: the router's cost)
                "default+shortlist_kv": RoutingPolicy(scorer="two_stage", shortlist_per_head=True),
                "default+shortlist_kv2": RoutingPolicy(
                    scorer="two_stage", shortlist_per_head=True, shortlist_factor=2
                ),
                **variant_policies(),  # scorers no policy field expresses
                **rep_policies(),  # representative keys (fidelity_repkeys.py)
            }
        )
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def run_setting_grid(engine, measure, lib_name: str, num_chunks: int, pols, fractions) -> list:
    """Rows for one library: all chunks, then each policy at each fraction."""
    rows = []
    m = measure(lib_name, num_chunks, None)
    rows.append({"policy": "all_chunks", "fraction": 1.0, "k": num_chunks, **_m(m)})
    print(f"  {lib_name} {'all_chunks':>22} k={num_chunks:>3}: {m.value:.4f}", flush=True)
    for name, pol in pols.items():
        for f in fractions:
            k = k_for(f, num_chunks)
            if k >= num_chunks:
                continue
            t0 = time.perf_counter()
            m = measure(lib_name, k, pol)
            row = {"policy": name, "fraction": f, "k": k, **_m(m)}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            cov = "" if m.coverage is None else f" coverage {m.coverage:.3f}"
            print(
                f"  {lib_name} {name:>22} k={k:>3} ({f:.3f}): {row['value']:.4f}{cov}", flush=True
            )
    return rows


def _m(m) -> dict:
    cov = None if m.coverage is None else round(m.coverage, 4)
    return {"value": round(m.value, 5), "coverage": cov, "n": m.n}


def code_signal(engine, args, pols, checkpoint=None) -> dict:
    """Loss of held-out code after a library of its package's other files."""
    from moska.bench.fidelity_code import code_tasks

    tasks = code_tasks(
        engine.tokenizer, args.library_tokens, args.targets, args.target_tokens, args.seed,
        tuple(args.packages),
    )  # fmt: skip
    results = []
    for task in tasks:
        seqs = [ids for _, ids in task.targets]
        alone = sequence_loss(engine, seqs, None, None, None)
        print(f"{task.package}: {task.library_tokens} library tokens, {len(seqs)} targets, "
              f"loss alone {alone.value:.4f}", flush=True)  # fmt: skip
        for mode in args.modes:
            for cs in args.chunk_sizes:
                name = f"fid-{task.package}-{mode}-{cs}-r{args.routing_rank or 'd'}"
                info = engine.libraries.build(
                    name, task.library_docs, chunk_size=cs, mode=mode,
                    routing_rank=args.routing_rank,
                )  # fmt: skip
                C = info.num_chunks

                def measure(lib, k, pol, seqs=seqs):
                    return sequence_loss(engine, seqs, lib, k, pol)

                rows = run_setting_grid(engine, measure, name, C, pols, args.fractions)
                full = rows[0]["value"]
                gap = alone.value - full
                for r in rows:
                    r["recovered"] = (
                        None if gap <= 0 else round((alone.value - r["value"]) / gap, 4)
                    )
                results.append({
                    "package": task.package, "mode": mode, "chunk_size": cs, "num_chunks": C,
                    "library_tokens": task.library_tokens, "targets": [n for n, _ in task.targets],
                    "no_library_loss": round(alone.value, 5), "rows": rows,
                })  # fmt: skip
                engine.libraries.delete(name)
                if checkpoint is not None:  # partial results survive a stopped run
                    checkpoint({"signal": "code_loss", "results": results, "partial": True})
    return {"signal": "code_loss", "results": results, "summary": summarize(results, "recovered")}


def retrieval_signal(engine, args, pols) -> dict:
    """Accuracy of retrieval answers; refused when the dense model is below --min-dense."""
    from moska.bench.retrieval_tasks import RetrievalSpec, make_examples

    spec = RetrievalSpec.load(Path(args.retrieval_model))
    spec = spec.with_context(args.context_tokens or spec.context_tokens)
    examples = make_examples(spec, args.questions, seed=10_000 + args.seed)
    dense_q = [(ex.context + ex.question, ex.answer) for ex in examples]
    dense = answer_accuracy(engine, dense_q, None, None, None)
    print(f"retrieval: dense accuracy {dense.value:.3f} over {dense.n}", flush=True)
    if dense.value < args.min_dense:
        return {
            "signal": "retrieval_accuracy", "refused": True, "dense_accuracy": dense.value,
            "reason": f"dense accuracy {dense.value:.3f} < {args.min_dense}: train longer "
            "(moska.bench.train_retrieval) before reading routing numbers off this model",
        }  # fmt: skip
    results = []
    for mode in args.modes:
        for cs in args.chunk_sizes:
            # one library per example (its context), its question asked after it
            per_example = []
            for i, ex in enumerate(examples):
                name = f"fidr-{mode}-{cs}-{i}"
                info = engine.libraries.build(
                    name, [("ctx", ex.context)], chunk_size=cs, mode=mode,
                    routing_rank=args.routing_rank,
                )  # fmt: skip
                per_example.append((name, info.num_chunks, ex))
            C = max(c for _, c, _ in per_example)

            def measure(_lib, k, pol, per_example=per_example):
                items = [(ex.question, ex.answer, name, None if k is None else min(k, c))
                         for name, c, ex in per_example]  # fmt: skip
                return answers_accuracy(engine, items, pol)

            rows_all = run_setting_grid(engine, measure, f"retrieval-{mode}-{cs}", C, pols,
                                        args.fractions)  # fmt: skip
            for name, _, _ in per_example:
                engine.libraries.delete(name)
            for r in rows_all:
                r["of_dense"] = round(r["value"] / dense.value, 4) if dense.value else None
            results.append({"mode": mode, "chunk_size": cs, "num_chunks": C, "rows": rows_all})
    return {
        "signal": "retrieval_accuracy", "refused": False, "dense_accuracy": dense.value,
        "results": results, "summary": summarize(results, "of_dense"),
    }  # fmt: skip


def summarize(results: list, key: str) -> dict:
    """policy -> fraction -> ``key`` per setting (package-mode-chunk size) and its mean over
    the settings that policy was measured in ("all": compare policies by setting, since not
    every policy ran in every setting)."""
    out: dict = {}
    for res in results:
        for r in res["rows"]:
            if r.get(key) is None:
                continue
            slot = out.setdefault(r["policy"], {}).setdefault(str(r["fraction"]), {})
            slot.setdefault("all", []).append(r[key])
            setting = "-".join(
                str(x) for x in (res.get("package"), res["mode"], res["chunk_size"]) if x
            )
            slot.setdefault(setting, []).append(r[key])
    return {
        p: {f: {k: round(sum(v) / len(v), 4) for k, v in d.items()} for f, d in by_f.items()}
        for p, by_f in out.items()
    }


def combine(paths: list[str], out: str) -> dict:
    """One JSON from several runs' code results (each row keeps its run's policy fields)."""
    import json

    runs, results = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append({"file": path, "command": data["env"].get("command"),
                     "git_commit": data["env"].get("git_commit")})  # fmt: skip
        for res in data.get("code", {}).get("results", []):
            for r in res["rows"]:
                r["policy_fields"] = data["policies"].get(r["policy"])
                r["run"] = path
            results.append(res)
    payload = {
        "env": environment(["moska.bench.fidelity", "--combine", *paths]),
        "runs": runs,  # each run's file keeps its device, dtype, shapes and arguments
        "results": results,
        "summary": summarize(results, "recovered"),
    }
    write_json(out, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moska bench fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--combine", nargs="+", default=None,
                    help="merge these result JSONs into --out instead of running")  # fmt: skip
    ap.add_argument("--code-model", default=None, help="moska-code-20m folder (code signal)")
    ap.add_argument("--retrieval-model", default=None,
                    help="a model folder from moska.bench.train_retrieval (retrieval signal)")  # fmt: skip
    ap.add_argument("--modes", nargs="+", default=["prefix", "independent"])
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--library-tokens", type=int, default=3072)
    ap.add_argument("--targets", type=int, default=4, help="held-out files per package")
    ap.add_argument("--packages", nargs="+", default=["networkx", "sympy"])
    ap.add_argument("--target-tokens", type=int, default=512)
    ap.add_argument("--routing-rank", type=int, default=None, help="library routing rank")
    ap.add_argument("--questions", type=int, default=256, help="retrieval questions")
    ap.add_argument("--context-tokens", type=int, default=None)
    ap.add_argument("--min-dense", type=float, default=0.9)
    ap.add_argument("--study", action="store_true", help="add the policy variants")
    ap.add_argument("--policies", nargs="+", default=None, help="only these named policies")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention", default="auto", choices=["auto", "triton", "torch"],
                    help="kernels: torch on CUDA runs routing and attention as the PyTorch "
                    "references (tells a kernel's loss from the policy's)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes, CPU")
    ap.add_argument("--out", default="bench/results/fidelity.json")
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out)
        print(f"wrote {args.out}")
        return
    if args.cpu_dry_run:
        args.device, args.modes, args.chunk_sizes = "cpu", ["prefix"], [64]
        args.library_tokens, args.targets, args.target_tokens = 256, 1, 64
        args.fractions, args.questions, args.context_tokens = [0.25], 4, args.context_tokens or 256
    pols = policies(args.study)
    if args.policies:
        pols = {k: v for k, v in pols.items() if k in args.policies}
    from moska.engine.llm_engine import LLMEngine

    payload = {"env": {**environment(["moska.bench.fidelity", *(argv or sys.argv[1:])]),
                       "git_commit": _git_commit()},
               "args": vars(args), "policies": {
                   k: {**v.to_dict(), **({"variant": VARIANTS[k]} if k in VARIANTS else {}),
                       **({"representatives": vars(REP_POLICIES[k])} if k in REP_POLICIES else {})}
                   for k, v in pols.items()}}  # fmt: skip
    summary = {}
    for kind, model in (("code", args.code_model), ("retrieval", args.retrieval_model)):
        if model is None:
            continue
        with tempfile.TemporaryDirectory(prefix="moska-fidelity-") as root:
            engine = LLMEngine.from_model(
                model, device=args.device, dtype=args.dtype, library_root=root,
                enable_prefix_caching=False, max_num_batched_tokens=8192,
                attention=args.attention,
            )  # fmt: skip
            payload["env"]["device"] = str(engine.device)
            # the "torch" ops' shared attention is batched (kernels/shared_attention_torch.py)
            payload["env"]["batched_torch_attention"] = engine.runner.ops.name == "torch"
            payload["env"]["dtype"] = str(engine.model_config.dtype) if hasattr(
                engine.model_config, "dtype") else args.dtype  # fmt: skip
            if kind == "code":

                def checkpoint(part, kind=kind):
                    write_json(args.out, {**payload, kind: part})

                payload[kind] = code_signal(engine, args, pols, checkpoint)
            else:
                payload[kind] = retrieval_signal(engine, args, pols)
            summary[kind] = payload[kind].get("summary", payload[kind].get("reason"))
    payload["summary"] = summary
    path = write_json(args.out, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
