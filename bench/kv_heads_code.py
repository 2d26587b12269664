"""KV-head compression on a small MHA code model trained for it (#21 item 2): the model of
moska.bench.train_code_lm (as many KV heads as query heads), converted by `moska convert
kv-heads` to half and a quarter of its KV heads (50 % and 75 % removed), by the fitted
projections and by mean-pooling (the GQA paper's conversion). No training after the
conversion.

Per checkpoint: next-token loss (nats/token) on held-out networkx and sympy windows
(moska.bench.heldout; text the model never saw) with moska's model and its dense reference
attention in fp32; KV bytes per token (bf16); transformers' logits against moska's on the
first window (fp32, rel err); the fitted energy kept per layer. Calibration (fit): modules of
the standard library (training text, not the evaluation text), as bench/kv_heads_quality.py.

Used by bench/kv_heads_quality.py --mha-code-model DIR (see there for the commands).
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kv_heads_retrieval import _environment, conversions, rel_err, transformers_logits

from moska.bench.heldout import PACKAGES, heldout_windows
from moska.model import DenseAttention, load_model
from moska.model.convert_kv_heads import calibration_sequences

# "a clear margin": the fitted conversion's loss increase at most half of mean-pooling's
CLEAR_MARGIN = 0.5


@torch.inference_mode()
def window_loss(model, ids: list[int], device: torch.device) -> tuple[float, int, torch.Tensor]:
    """(summed next-token loss, tokens scored, logits [T, V] fp32 on CPU) of one window."""
    x = torch.tensor(ids, device=device)
    hidden = model(x, torch.arange(len(ids), device=device), DenseAttention(model.config.sm_scale))
    logits = model.compute_logits(hidden).float()
    loss = F.cross_entropy(logits[:-1], x[1:], reduction="sum")
    return float(loss), len(ids) - 1, logits.cpu()


def evaluate(path: Path, windows: dict[str, list], device: torch.device, hf: bool) -> dict:
    t0 = time.perf_counter()
    lm = load_model(path, dtype="float32", device=device)
    per_pkg, tot, cnt, first = {}, 0.0, 0, None
    for pkg, wins in windows.items():
        s = n = 0
        for w in wins:
            ls, ln, logits = window_loss(lm.model, w, device)
            first = logits if first is None else first
            s, n = s + ls, n + ln
        per_pkg[pkg] = round(s / n, 4)
        tot, cnt = tot + s, cnt + n
    row = {
        "kv_heads": lm.config.num_kv_heads,
        "kv_bytes_per_token_bf16": lm.config.kv_bytes_per_token(torch.bfloat16),
        "loss": round(tot / cnt, 5),
        "loss_by_package": per_pkg,
        "tokens": cnt,
    }
    del lm
    if hf and first is not None:
        ref = transformers_logits(path, next(iter(windows.values()))[0], device)
        row["transformers_logits_rel_err"] = float(f"{rel_err(first, ref):.3e}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run(args, write, calibration_files: tuple[str, ...]) -> dict:
    """Measure the original and each conversion (``calibration_files``: stdlib-relative);
    ``write(result)`` after every row."""
    src = Path(args.mha_code_model)
    t0 = time.perf_counter()
    dev = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available()
                       else "cpu")  # fmt: skip
    cfg = json.loads((src / "config.json").read_text())
    kv = cfg["num_key_value_heads"]
    targets = args.kv_heads or [kv // 2, kv // 4]
    lm = load_model(src, dtype="float32")
    windows = heldout_windows(lm.tokenizer, args.length, args.windows, seed=0)
    del lm
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = calibration_sequences(
        src, [stdlib / f for f in calibration_files], args.length, args.calibration_tokens
    )
    rows: list[dict] = []
    result = {
        "environment": _environment(),
        "what": "held-out token loss after KV-head compression (`moska convert kv-heads`, fitted "
        "vs mean-pooling) of an MHA code model trained for it; no training after",
        "model": {"path": src.name, "hidden": cfg["hidden_size"],
                  "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
                  "kv_heads": kv, "head_dim": cfg.get("head_dim"), "vocab": cfg["vocab_size"],
                  "dtype": cfg.get("dtype", cfg.get("torch_dtype"))},
        "heldout": {p: f"{args.windows} windows x {args.length} tokens" for p in PACKAGES},
        "calibration": {"files": list(calibration_files), "tokens": sum(map(len, calib))},
        "device": str(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"),
        "loss_dtype": "float32",
        "training": _training(src),
        "rows": rows,
        "summary": {},
    }  # fmt: skip

    def add(row: dict) -> None:
        base = rows[0] if rows else row
        row["delta_vs_original"] = round(row["loss"] - base["loss"], 5)
        rows.append(row)
        print(f"  {row['variant']} {kv}->{row['kv_heads']}: {row}", file=sys.stderr, flush=True)
        result["summary"] = summarize(rows, kv, targets)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result)

    add({"variant": "original", "removed": 0.0, **evaluate(src, windows, dev, args.hf)})
    conversions(src, targets, calib, lambda out: evaluate(out, windows, dev, args.hf), add)
    return result


def summarize(rows: list[dict], kv: int, targets: list[int]) -> dict:
    """Per ratio: loss of original / fit / mean, their increases, whether the fit is closer by
    the clear margin (its increase <= CLEAR_MARGIN x mean-pooling's); the largest
    transformers-vs-moska logits error."""
    base, out = rows[0], {}
    for n in targets:
        by = {r["variant"]: r for r in rows if r["kv_heads"] == n}
        if set(by) != {"fit", "mean"}:
            continue
        fit, mean = by["fit"]["delta_vs_original"], by["mean"]["delta_vs_original"]
        out[f"{kv}->{n}"] = {
            "removed": by["fit"]["removed"],
            "loss": {"original": base["loss"], "fit": by["fit"]["loss"],
                     "mean": by["mean"]["loss"]},
            "increase": {"fit": fit, "mean": mean},
            "fit_closer_than_mean": abs(fit) < abs(mean),
            "fit_increase_share_of_mean": round(fit / mean, 4) if mean > 0 else None,
            "clear_margin": abs(fit) <= CLEAR_MARGIN * abs(mean),
        }  # fmt: skip
    half = out.get(f"{kv}->{kv // 2}")
    out["target"] = ("the fitted compression at 50 % is closer to the original loss than "
                     f"mean-pooling by a clear margin (fit's increase <= {CLEAR_MARGIN} x "
                     "mean's)")  # fmt: skip
    out["target_met"] = bool(half and half["clear_margin"])
    agree = [r["transformers_logits_rel_err"] for r in rows if "transformers_logits_rel_err" in r]
    if agree:
        out["transformers_logits_rel_err_max"] = max(agree)
    return out


def _training(src: Path) -> dict | None:
    log = src / "train_log.json"
    if not log.is_file():
        return None
    t = json.loads(log.read_text())
    return {k: t.get(k) for k in ("args", "corpus", "summary", "log")}


def print_table(result: dict) -> None:
    print(f"{'variant':<9} {'KV':>3} {'removed':>7} {'KV B/tok':>8} {'loss':>8} {'delta':>8}"
          + "".join(f" {p:>9}" for p in PACKAGES) + f" {'hf rel err':>10}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['variant']:<9} {r['kv_heads']:>3} {r['removed']:>7.2f} "
              f"{r['kv_bytes_per_token_bf16']:>8} {r['loss']:>8.4f} "
              f"{r['delta_vs_original']:>+8.4f}"
              + "".join(f" {r['loss_by_package'][p]:>9.4f}" for p in PACKAGES)
              + f" {r.get('transformers_logits_rel_err', '-'):>10}")  # fmt: skip
    for r in result["rows"]:
        if "energy_kept" in r:
            print(
                f"energy kept ({r['variant']} ->{r['kv_heads']}): K {r['energy_kept']['k']} "
                f"V {r['energy_kept']['v']}"
            )
    s = result["summary"]
    print("target met:", s.get("target_met"), "| hf rel err max:",
          s.get("transformers_logits_rel_err_max"))  # fmt: skip
