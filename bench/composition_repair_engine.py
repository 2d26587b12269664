"""Boundary repair through the engine: token loss of composed requests over libraries built
with and without repair (``moska.library.boundary_repair``), on moska-code-20m, on the same
windows as ``bench/composition_quality.py`` (networkx packages: a request file, the
package's other files in ``--libraries`` position-independent libraries).

Everything runs through the engine (``LLMEngine``, CPU fp32, attention "torch"): the
libraries are built by its ``LibraryManager`` (``boundary_repair=(m, L)``, what ``moska
library build --repair-tokens m --repair-layers L`` and ``POST /v1/libraries`` build), and
the loss is the mean next-token cross-entropy of the request's tokens from the engine's
prompt logprobs (``moska.bench.fidelity_eval.sequence_loss``) for a request that names all
the libraries (composition), at top-k = all chunks and at 25 % of them. ``sequential``: the
files then the request as one plain prompt (each file after its BOS), scored on the
request's tokens only: the reference. ``reference_composed_all``: the plain-PyTorch
composition of composition_quality.py over the engine's built (unrepaired) libraries, a
check that the engine computes the same thing.

The windows' tokens come from ``bench/composition_windows.json`` (written by
``composition_quality.py --save-windows``: the same 8 packages' files, so a machine without
this venv's networkx reads the same tokens). The engine's CPU composed attention is a
Python loop per selection: ``--workers`` runs windows in parallel processes (the device's
16 cores: ``bench/device_session17_repair.sh``).

Usage: .venv/bin/python bench/composition_repair_engine.py [--samples 8] [--repair 8/2 32/2]
           [--workers 8 --threads 2] [--rows-jsonl FILE]
       .venv/bin/python bench/composition_repair_engine.py --cpu-dry-run  (2 samples, short)
       .venv/bin/python bench/composition_repair_engine.py --from-rows FILE  (summarize only)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.composition_quality import composed_loss
from bench.composition_workload import windows
from moska.bench.common import environment
from moska.bench.fidelity_eval import sequence_loss
from moska.library.boundary_repair import BoundaryRepair
from moska.library.composition import ComposedLibrary
from moska.library.positions import IndependentOptions

# A repair setting is the default only if it lowers the mean loss by at least this much at
# both top-k settings (the unrepaired spread between packages is larger than that).
MIN_GAIN_PCT = 0.5


def parse_setting(text: str) -> BoundaryRepair:
    tokens, layers = text.split("/")
    return BoundaryRepair(int(tokens), int(layers))


def window_row(engine, index: int, window, args, settings) -> dict:
    """Losses of one window: per setting the composed request at top-k all and 25 % over
    libraries built by the engine's manager with that repair; with "off" also sequential and
    the plain-PyTorch reference."""
    req_path, request, groups = window
    request = request[: args.request_tokens]
    bos = engine.tokenizer.bos_token_id
    lib_files = [ids[: args.file_tokens] for g in groups for _, ids in g]
    ctx = [t for f in lib_files for t in [bos, *f]]
    loss = {}
    if "off" in settings:
        loss["sequential"] = sequence_loss(
            engine, [ctx + request], None, None, None, len(ctx)
        ).value
    row: dict = {
        "window": index,
        "package": str(req_path.parent).split("site-packages/")[-1],
        "request": req_path.name,
        "library_files": [[f.name for f, _ in g] for g in groups],
        "request_tokens": len(request),
    }
    build_s = {}
    for key, repair in settings.items():
        names = [f"w{index}-{key}-{i}" for i in range(len(groups))]
        t0 = time.perf_counter()
        for name, group in zip(names, groups):
            docs = [(f.name, ids[: args.file_tokens]) for f, ids in group]
            engine.libraries.build(
                name, docs, args.chunk_size, "independent", boundary_repair=repair,
                independent=IndependentOptions(chunk_sink=True), keep_loaded=True,
            )  # fmt: skip
        build_s[key] = round(time.perf_counter() - t0, 3)
        parts = [engine.libraries.get(n) for n in names]
        chunks = sum(p.num_chunks for p in parts)
        quarter = max(1, chunks // 4)
        row.update(chunks=chunks, top_k_25pct=quarter)
        for suffix, k in (("all", chunks), ("top25", quarter)):
            loss[f"{key}_{suffix}"] = sequence_loss(engine, [request], names, k, None).value
        if key == "off":  # the plain-PyTorch composition over the same built libraries
            comp = ComposedLibrary(tuple(parts))
            loss["reference_composed_all"] = composed_loss(
                engine.loaded.model, comp, request, chunks
            )
        for name in names:
            engine.libraries.delete(name)
    row["loss"] = loss
    row["library_build_s"] = build_s
    return row


def settings_of(args) -> dict:
    return {"off": None} | {f"m{s.replace('/', '_L')}": parse_setting(s) for s in args.repair}


def merge_rows(parts: list[dict]) -> list[dict]:
    """One row per window from the rows of its (window, setting) tasks, in window order."""
    rows: dict[int, dict] = {}
    for part in sorted(parts, key=lambda r: r["window"]):
        row = rows.setdefault(part["window"], part | {"loss": {}, "library_build_s": {}})
        row["loss"].update(part["loss"])
        row["library_build_s"].update(part["library_build_s"])
    return list(rows.values())


def run_part(tasks: list[tuple[int, str]] | None, args) -> list[dict]:
    """The rows of (window, setting) ``tasks`` (None: every window, every setting) on an
    engine of this process's own (a worker's)."""
    from moska.engine.llm_engine import LLMEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = settings_of(args)
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine.from_model(
            args.model, device="cpu", dtype="float32", attention="torch", library_root=root,
            max_model_len=2048, num_kv_blocks=256,
        )  # fmt: skip
        engine.libraries.progress = False
        items = windows(engine.tokenizer, args)
        rows = []
        if tasks is None:
            tasks = [(i, key) for i in range(len(items)) for key in settings]
        for i, key in tasks:
            rows.append(window_row(engine, i, items[i], args, {key: settings[key]}))
            if args.rows_jsonl:  # a run cut short still leaves its finished rows
                with open(args.rows_jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps({k: round(v, 4) for k, v in rows[-1]["loss"].items()}), flush=True)
    return rows


def summarize(rows: list[dict], settings: dict) -> dict:
    keys = list(rows[0]["loss"])
    mean = {k: sum(r["loss"][k] for r in rows) / len(rows) for k in keys}
    seq = mean["sequential"]
    vs_off = {}
    for key in settings:
        if key == "off":
            continue
        vs_off[key] = {
            s: round(100 * (mean[f"{key}_{s}"] - mean[f"off_{s}"]) / mean[f"off_{s}"], 3)
            for s in ("all", "top25")
        }
        vs_off[key]["packages_better_top25"] = sum(
            r["loss"][f"{key}_top25"] < r["loss"]["off_top25"] for r in rows
        )
    gains = {k: -max(v["all"], v["top25"]) for k, v in vs_off.items()}
    best = max(gains, key=lambda k: gains[k]) if gains else None
    default = best if best is not None and gains[best] >= MIN_GAIN_PCT else "off"
    ref_gap = max(abs(r["loss"]["reference_composed_all"] - r["loss"]["off_all"]) for r in rows)
    return {
        "samples": len(rows),
        "mean_loss": {k: round(v, 4) for k, v in mean.items()},
        "vs_sequential_pct": {k: round(100 * (v - seq) / seq, 2) for k, v in mean.items()},
        "repair_vs_off_pct": vs_off,
        "engine_vs_reference_max_abs": round(ref_gap, 5),
        "default": default,
        "default_rule": f"a repair setting is the default when it lowers the mean loss vs off "
        f"by >= {MIN_GAIN_PCT} % at both top-k all and 25 %; else off",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--libraries", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--file-tokens", type=int, default=384)
    ap.add_argument("--files-per-library", type=int, default=2)
    ap.add_argument("--request-tokens", type=int, default=384)
    ap.add_argument("--repair", nargs="+", default=["8/2", "32/2", "32/8"], help="M/L settings")
    ap.add_argument(
        "--windows",
        default=str(ROOT / "bench/composition_windows.json"),
        help="the windows' tokens (composition_quality.py --save-windows); '' reads networkx",
    )
    ap.add_argument("--workers", type=int, default=1, help="processes, a (window, setting) each")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: all)")
    ap.add_argument("--rows-jsonl", default=None, help="append each finished row there too")
    ap.add_argument("--from-rows", default=None, help="summarize these JSONL rows, run nothing")
    ap.add_argument("--cpu-dry-run", action="store_true", help="2 samples, short texts")
    ap.add_argument("--out", default=str(ROOT / "bench/results/composition_repair_engine.json"))
    args = ap.parse_args()
    if args.cpu_dry_run:
        args.samples, args.file_tokens, args.request_tokens, args.repair = 2, 160, 96, ["8/2"]
    settings = settings_of(args)
    t0 = time.time()
    if args.from_rows:
        lines = Path(args.from_rows).read_text().splitlines()
        rows = merge_rows([json.loads(x) for x in lines if x.strip()])
        rows = [r for r in rows if all(f"{k}_top25" in r["loss"] for k in settings)]
    elif args.workers <= 1 or not args.windows:
        rows = merge_rows(run_part(None, args))
    else:  # the engine's CPU composed attention is a Python loop: tasks in parallel
        tasks = [[(i, key)] for i in range(len(windows(None, args))) for key in settings]
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            parts = pool.map(run_part, tasks, [args] * len(tasks))
            rows = merge_rows([r for part in parts for r in part])
    summary = summarize(rows, settings) | {"seconds": round(time.time() - t0, 1)}
    out = {
        "env": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": Path(args.model).name,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": args.threads or torch.get_num_threads(),
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
