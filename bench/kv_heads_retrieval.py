"""KV-head compression on a small MHA model trained for it (#21 item 2): the retrieval model
of moska.bench.train_retrieval trained with as many KV heads as query heads, converted by
`moska convert kv-heads` to fewer KV heads (4 -> 2 and 4 -> 1: 50 % and 75 % removed), by
the fitted projections and by mean-pooling (the GQA paper's conversion). No training after
the conversion.

Measured per checkpoint, on held-out questions of the task the model was trained on
(``retrieval_tasks.make_examples`` with the fidelity benchmark's seeds):
- dense accuracy: greedy answers through the engine, exact match, no library (what
  moska.bench.fidelity calls the dense accuracy: its floor for reading routing numbers is 0.9);
- answer loss: teacher-forced cross-entropy of the answer tokens (nats/token), moska's model
  with the dense reference attention in fp32. The model is trained on answers only (the rest
  of a context is random filler), so the loss of the other tokens means nothing;
- agreement: transformers' logits against moska's on one example (rel err), every checkpoint.
Calibration (fit): sequences of the task's own generator (a context followed by questions
on its facts and their answers, ``train_retrieval.batch``) from a seed that neither
training (0-15) nor evaluation (10,000+) uses.

Used by bench/kv_heads_quality.py --retrieval-model DIR (see there for the commands).
"""

from __future__ import annotations

import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moska.bench.common import environment
from moska.bench.fidelity_eval import answer_accuracy
from moska.bench.retrieval_tasks import Example, RetrievalSpec, make_examples
from moska.bench.train_retrieval import batch
from moska.model import DenseAttention, load_model
from moska.model.convert_kv_heads import convert_kv_heads

CALIBRATION_SEED = 777


def calibration(spec: RetrievalSpec, sequences: int, seed: int = CALIBRATION_SEED) -> list:
    """``sequences`` token-id lists of the task: a full context, then a question on each of
    its facts (drawn with replacement) and its answer, as in training."""
    ids, _, lengths = batch(spec, random.Random(seed), sequences, 0, keys=False)
    return [ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]


@torch.inference_mode()
def answer_loss(lm, examples: list[Example], device: torch.device) -> dict:
    """Teacher-forced answer-token loss (nats/token) and exact match (every answer token the
    argmax) of moska's model, dense reference attention; plus its logits of the first example
    (for the transformers check)."""
    model = lm.model
    total, count, hits, first = 0.0, 0, 0, None
    for ex in examples:
        ids = ex.context + ex.question + ex.answer
        x = torch.tensor(ids, device=device)
        attn = DenseAttention(model.config.sm_scale)  # it keeps the KV it saw: one each
        hidden = model(x, torch.arange(len(ids), device=device), attn)
        if first is None:
            first = model.compute_logits(hidden).float().cpu()
        a0 = len(ids) - len(ex.answer)
        logits = model.compute_logits(hidden[a0 - 1 : len(ids) - 1]).float()
        tgt = x[a0:]
        total += float(F.cross_entropy(logits, tgt, reduction="sum"))
        count += len(ex.answer)
        hits += bool((logits.argmax(-1) == tgt).all())
    return {"loss": total / max(count, 1), "exact": hits / max(len(examples), 1), "first": first}


@torch.inference_mode()
def transformers_logits(path: Path, ids: list[int], device: torch.device) -> torch.Tensor:
    """transformers' logits [T, V] of ``ids`` (fp32): the converted checkpoint is plain GQA."""
    import transformers

    # no dtype argument (its name changed across transformers versions): the bf16 weights
    # are cast to fp32 after loading, exactly
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf = hf.to(device=device, dtype=torch.float32)
    out = hf(torch.tensor([ids], device=device)).logits[0].float().cpu()
    del hf
    return out


def engine_accuracy(path: Path, examples: list[Example], device: str, dtype: str) -> float:
    """The fidelity benchmark's dense accuracy: greedy answers through the engine."""
    from moska.engine.llm_engine import LLMEngine

    longest = max(len(ex.context) + len(ex.question) + len(ex.answer) for ex in examples)
    with tempfile.TemporaryDirectory(prefix="kvh-lib-") as root:
        engine = LLMEngine.from_model(
            str(path), device=device, dtype=dtype, library_root=root,
            enable_prefix_caching=False, max_num_batched_tokens=8192, enforce_eager=True,
            num_kv_blocks=len(examples) * (longest // 16 + 2) + 16,
        )  # fmt: skip
        qs = [(ex.context + ex.question, ex.answer) for ex in examples]
        acc = answer_accuracy(engine, qs, None, None, None).value
        engine.shutdown()
        del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return acc


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def evaluate(path: Path, examples, args, hf: bool) -> dict:
    """One checkpoint's row: dense accuracy, answer loss, KV bytes, transformers agreement."""
    t0 = time.perf_counter()
    row: dict = {"dense_accuracy": engine_accuracy(path, examples, args.device, args.dtype)}
    dev = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available()
                       else "cpu")  # fmt: skip
    lm = load_model(path, dtype="float32", device=dev)
    m = answer_loss(lm, examples, dev)
    row.update(
        kv_heads=lm.config.num_kv_heads,
        kv_bytes_per_token_bf16=lm.config.kv_bytes_per_token(torch.bfloat16),
        answer_loss=round(m["loss"], 6),
        teacher_forced_exact=round(m["exact"], 4),
    )
    del lm
    if hf:
        ex = examples[0]
        ref = transformers_logits(path, ex.context + ex.question + ex.answer, dev)
        row["transformers_logits_rel_err"] = float(f"{rel_err(m['first'], ref):.3e}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run(args, write) -> dict:
    """Measure the original and each conversion; ``write(result)`` after every checkpoint's
    row (a run cut short by its time limit keeps the rows it finished)."""
    src = Path(args.retrieval_model)
    t0 = time.perf_counter()
    spec = RetrievalSpec.load(src)
    spec = spec.with_context(args.context_tokens or spec.context_tokens)
    examples = make_examples(spec, args.questions, seed=10_000)
    calib = calibration(spec, args.calibration_sequences)
    cfg = json.loads((src / "config.json").read_text())
    kv = cfg["num_key_value_heads"]
    targets = args.kv_heads or [kv // 2, kv // 4]
    rows: list[dict] = []
    result = {
        "environment": _environment(),
        "what": "retrieval accuracy and answer loss after KV-head compression (`moska convert "
        "kv-heads`, fitted vs mean-pooling) of an MHA model trained for it; no training after",
        "model": {"path": src.name, "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                  "heads": cfg["num_attention_heads"], "kv_heads": kv,
                  "head_dim": cfg.get("head_dim"), "vocab": cfg["vocab_size"],
                  "dtype": cfg.get("dtype", cfg.get("torch_dtype"))},
        "task": {"context_tokens": spec.context_tokens, "facts": spec.facts,
                 "formats": list(spec.formats), "questions": len(examples), "eval_seed": 10_000},
        "calibration": {"sequences": len(calib), "tokens": sum(map(len, calib)),
                        "seed": CALIBRATION_SEED, "source": "train_retrieval.batch"},
        "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
        "engine_dtype": args.dtype, "loss_dtype": "float32",
        "training": _training(src),
        "rows": rows,
        "summary": {},
    }  # fmt: skip

    def add(row: dict) -> None:
        base = rows[0] if rows else row  # the original comes first
        row["answer_loss_delta"] = round(row["answer_loss"] - base["answer_loss"], 6)
        rows.append(row)
        print(f"  {row['variant']} {kv}->{row['kv_heads']}: {row}", file=sys.stderr, flush=True)
        result["summary"] = summarize(rows, kv, targets)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result)

    add({"variant": "original", "removed": 0.0, **evaluate(src, examples, args, args.hf)})
    conversions(src, targets, calib, lambda out: evaluate(out, examples, args, args.hf), add)
    return result


def conversions(
    src: Path,
    targets: list[int],
    calib: list,
    evaluate_one: Callable[[Path], dict],
    add: Callable[[dict], None],
) -> None:
    """Convert `src` to each KV-head count of `targets`, by the fitted projections and by
    mean-pooling, into a temporary folder; `add` each one's row: variant, share of KV heads
    removed, `evaluate_one(checkpoint)` and (fit) the energy kept per layer."""
    kv = json.loads((src / "config.json").read_text())["num_key_value_heads"]
    with tempfile.TemporaryDirectory(prefix="kvh-") as tmp:
        for n in targets:
            for method in ("fit", "mean"):
                out = Path(tmp) / f"{method}{n}"
                rep = convert_kv_heads(src, out, kv_heads=n, calibration=calib, method=method)
                row = {"variant": method, "removed": round(1 - n / kv, 4)}
                row.update(evaluate_one(out))
                if method == "fit":
                    row["energy_kept"] = {"k": [round(e, 4) for e in rep.k_energy],
                                          "v": [round(e, 4) for e in rep.v_energy]}  # fmt: skip
                add(row)


def summarize(rows: list[dict], kv: int, targets: list[int]) -> dict:
    """Per ratio: dense accuracy and answer loss of original / fit / mean; whether the fit is
    the closer to the original's loss; the largest transformers-vs-moska logits error."""
    base, out = rows[0], {}
    for n in targets:
        by = {r["variant"]: r for r in rows if r["kv_heads"] == n}
        if set(by) != {"fit", "mean"}:
            continue
        fit, mean = by["fit"], by["mean"]
        out[f"{kv}->{n}"] = {
            "removed": fit["removed"],
            "dense_accuracy": {"original": base["dense_accuracy"],
                               "fit": fit["dense_accuracy"], "mean": mean["dense_accuracy"]},
            "answer_loss": {"original": base["answer_loss"], "fit": fit["answer_loss"],
                            "mean": mean["answer_loss"]},
            "fit_closer_than_mean": abs(fit["answer_loss_delta"]) < abs(mean["answer_loss_delta"]),
        }  # fmt: skip
    agree = [r["transformers_logits_rel_err"] for r in rows if "transformers_logits_rel_err" in r]
    if agree:
        out["transformers_logits_rel_err_max"] = max(agree)
    out["original_dense_accuracy_ok"] = base["dense_accuracy"] >= 0.9
    return out


def _environment() -> dict:
    env = environment()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _training(src: Path) -> dict | None:
    """The training run's arguments and log (train_retrieval writes it beside the model)."""
    log = src / "train_log.json"
    if not log.is_file():
        return None
    t = json.loads(log.read_text())
    keep = ("context", "start_context", "facts", "steps", "max_minutes", "batch", "lr",
            "hidden", "layers", "heads", "kv_heads", "vocab", "formats", "save_dtype", "seed",
            "resume", "advance_at", "forced_after", "min_lr", "workers")  # fmt: skip
    out = {"args": {k: t["args"].get(k) for k in keep},
           "final": t["log"][-1] if t["log"] else None, "log": t["log"]}  # fmt: skip
    first = src / "train_log_before_resume.json"  # the device script's second call, if any
    if first.is_file():
        t = json.loads(first.read_text())
        out["before_resume"] = {"args": {k: t["args"].get(k) for k in keep}, "log": t["log"]}
    return out


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(f"{'variant':<9} {'KV':>3} {'removed':>7} {'KV B/tok':>8} {'dense acc':>9} "
          f"{'ans loss':>9} {'delta':>8} {'tf exact':>8} {'hf rel err':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['variant']:<9} {r['kv_heads']:>3} {r['removed']:>7.2f} "
              f"{r['kv_bytes_per_token_bf16']:>8} {r['dense_accuracy']:>9.4f} "
              f"{r['answer_loss']:>9.4f} {r['answer_loss_delta']:>+8.4f} "
              f"{r['teacher_forced_exact']:>8.4f} "
              f"{r.get('transformers_logits_rel_err', '-'):>10}")  # fmt: skip
