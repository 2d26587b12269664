"""What KV-head compression costs in quality, without training: token loss of moska-code-20m
(2 KV heads) and its `moska convert kv-heads --kv-heads 1` variants (MQA, half the KV):
the fitted projections vs mean-pooling (the GQA paper's conversion).

Calibration text: modules of the Python standard library (in the model's training data; not
the evaluation text). Evaluation: held-out networkx and sympy windows of 2,048 tokens, as in
bench/mlkv_quality.py. CPU, fp32, moska's own model code.

Usage: .venv/bin/python bench/kv_heads_quality.py [--windows 2] [--calibration-tokens 16384]

With ``--retrieval-model DIR`` (bench/kv_heads_retrieval.py): an MHA retrieval model trained
for it (moska.bench.train_retrieval --kv-heads 4 --heads 4), converted to 50 % and 75 % fewer
KV heads, fitted and mean-pooled: dense retrieval accuracy through the engine, answer-token
loss, transformers' logits against moska's. GPU (bench/device_session17_kv_heads.sh):
    python3 bench/kv_heads_quality.py --retrieval-model DIR --device cuda --questions 128 \
        --out OUT.json
CPU check: ... --retrieval-model DIR --cpu-dry-run --out /tmp/kvh.json

With ``--mha-code-model DIR`` (bench/kv_heads_code.py): an MHA code model trained for it
(moska.bench.train_code_lm), converted to 50 % and 75 % fewer KV heads, fitted and
mean-pooled: held-out networkx/sympy token loss at the model's training length, transformers'
logits against moska's. GPU (bench/device_session18_mha_code.sh):
    python3 bench/kv_heads_quality.py --mha-code-model DIR --device cuda --windows 8 \
        --out OUT.json
CPU check: ... --mha-code-model DIR --cpu-dry-run --out /tmp/kvh-code.json
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlkv_quality import PACKAGES, ROOT, heldout_windows, token_loss

from moska.bench.common import environment
from moska.model import load_model
from moska.model.convert_kv_heads import calibration_sequences, convert_kv_heads

STDLIB_FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "inspect.py",
                "pathlib.py", "typing.py", "subprocess.py", "tarfile.py")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--windows", type=int, default=2, help="windows per held-out package")
    ap.add_argument("--length", type=int, default=None,
                    help="window tokens (default 2,048; MHA code model: its training context)")  # fmt: skip
    ap.add_argument("--kv-heads", type=int, nargs="+", default=None,
                    help="KV heads to keep (code model: 1; retrieval: half and a quarter)")  # fmt: skip
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(ROOT / "bench/results/kv_heads_quality.json"))
    ap.add_argument("--retrieval-model", default=None, help="an MHA train_retrieval model")
    ap.add_argument("--mha-code-model", default=None, help="an MHA train_code_lm model")
    ap.add_argument("--questions", type=int, default=128, help="retrieval: held-out questions")
    ap.add_argument("--context-tokens", type=int, default=None, help="retrieval: context")
    ap.add_argument("--calibration-sequences", type=int, default=16,
                    help="retrieval: generator sequences to fit on (a context + questions)")  # fmt: skip
    ap.add_argument("--device", default="auto", help="retrieval: engine and loss device")
    ap.add_argument("--dtype", default="auto", help="retrieval: engine dtype")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                    help="retrieval: compare transformers' logits with moska's")  # fmt: skip
    ap.add_argument("--cpu-dry-run", action="store_true", help="retrieval: toy sizes on CPU")
    args = ap.parse_args()
    if args.mha_code_model:
        import kv_heads_code

        if args.cpu_dry_run:
            args.device, args.windows, args.calibration_tokens = "cpu", 1, 512
        if args.length is None:
            train_log = Path(args.mha_code_model) / "train_log.json"
            ctx = json.loads(train_log.read_text())["args"]["context"] if train_log.is_file() else 0
            args.length = ctx or 1024
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)

        def write_code(result: dict) -> None:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

        kv_heads_code.print_table(kv_heads_code.run(args, write_code, STDLIB_FILES))
        print(f"wrote {args.out}")
        return
    args.length = args.length or 2048
    if args.retrieval_model:
        from kv_heads_retrieval import print_table, run

        if args.cpu_dry_run:
            args.device, args.questions, args.calibration_sequences = "cpu", 4, 2
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)

        def write(result: dict) -> None:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

        print_table(run(args, write))
        print(f"wrote {args.out}")
        return
    kv_heads = args.kv_heads[0] if args.kv_heads else 1
    src = Path(args.model)
    t0 = time.perf_counter()
    orig = load_model(src, dtype="float32")
    windows = heldout_windows(orig.tokenizer, args.length, args.windows, seed=0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = calibration_sequences(
        src, [stdlib / f for f in STDLIB_FILES], args.length, args.calibration_tokens
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvh-") as tmp:
        variants = [("original", None, src)]
        for method in ("fit", "mean"):
            out = Path(tmp) / method
            report = convert_kv_heads(src, out, kv_heads=kv_heads, calibration=calib, method=method)
            variants.append((method, report, out))
        for name, report, path in variants:
            lm = orig if path == src else load_model(path, dtype="float32")
            per_pkg, tot, cnt = {}, 0.0, 0
            for pkg, wins in windows.items():
                s = n = 0
                for w in wins:
                    ls, ln = token_loss(lm.model, w)
                    s, n = s + ls, n + ln
                per_pkg[pkg] = round(s / n, 4)
                tot, cnt = tot + s, cnt + n
            row = {
                "variant": name,
                "kv_heads": lm.config.num_kv_heads,
                "kv_bytes_per_token_bf16": lm.config.kv_bytes_per_token(torch.bfloat16),
                "loss": round(tot / cnt, 4),
                "loss_by_package": per_pkg,
                "tokens": cnt,
            }
            if report is not None and name == "fit":
                row["energy_kept_k"] = [round(e, 4) for e in report.k_energy]
                row["energy_kept_v"] = [round(e, 4) for e in report.v_energy]
            rows.append(row)
            print(f"  {name}: {tot / cnt:.4f}", file=sys.stderr, flush=True)
    base = rows[0]["loss"]
    for r in rows:
        r["delta_vs_original"] = round(r["loss"] - base, 4)
    print(f"{'variant':<10} {'KV heads':>8} {'KV B/token':>10} {'loss':>7} {'delta':>7}"
          + "".join(f" {p:>9}" for p in PACKAGES))  # fmt: skip
    for r in rows:
        print(f"{r['variant']:<10} {r['kv_heads']:>8} {r['kv_bytes_per_token_bf16']:>10} "
              f"{r['loss']:>7.4f} {r['delta_vs_original']:>+7.4f}"
              + "".join(f" {r['loss_by_package'][p]:>9.4f}" for p in PACKAGES))  # fmt: skip
    fit = rows[1]
    print("energy kept per layer (fit): K", fit["energy_kept_k"], "V", fit["energy_kept_v"])
    result = {
        "environment": environment(),
        "model": src.name,
        "what": "token loss (nats) after KV-head compression by `moska convert kv-heads`, "
        "no training",
        "calibration": {"files": list(STDLIB_FILES), "tokens": sum(map(len, calib))},
        "heldout": {p: f"{args.windows} windows x {args.length} tokens" for p in PACKAGES},
        "device": "cpu",
        "dtype": "float32",
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
