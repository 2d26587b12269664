"""Tensor parallelism's decode speed through the real engine: `LLM(..., tensor_parallel_size=N)`
against N = 1 on the same random-weight checkpoint, in one run.

The checkpoint is Llama-3.1-8B-shaped (`--layers` of its 32 layers, bf16 random weights,
written once with transformers' save_pretrained; no tokenizer: prompts are token ids).
Per batch size B: B prompts of `--prompt` random tokens, greedy with ignore_eos, timed once
with max_tokens = 1 (prefill and one token) and once with 1 + `--tokens`; decode tokens/s =
B * tokens / (second - first). The engine is built once per variant and warmed up first.
Variants (`--tp`): "1" (one GPU, its CUDA graphs: the strongest single-GPU baseline), "2"
(TP = 2 with NCCL: decode steps replay CUDA graphs on both ranks, distributed/tp_graphs.py)
and "2e" (TP = 2 with enforce_eager: eager steps, the state before the graphs); an "l"
("2l") has greedy steps gather the logits to rank 0 as before session 14, instead of each
rank's argmax (MOSKA_TP_ARGMAX_GATHER=0). Every
bucket's graph is captured before timing, as `moska serve` does (earlier runs captured each
inside its first timed decode); each row records the graphs rank 0 captured and replayed.
On CPU (gloo) TP steps are eager.

`--profile`: per variant, B = `--profile-batch` requests decoding together (prefills over),
then `--steady-steps` engine steps timed one by one (the decode step alone, without the
staggered prefill ramp that the generate() difference above includes at B > 32) with rank
0's host time split (schedule / launch / send / head / finish), then `--profile-steps`
more under torch.profiler: the top ops by self CPU and by self device time
(bench/tp_profile.py). Written under "steady" in the JSON and printed.

GPU (2 GPUs, NCCL):  python3 bench/tp_decode.py --out $OUT/tp_decode_h200x2.json
CPU check (gloo, tiny dims):  .venv/bin/python bench/tp_decode.py --cpu-dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.bench.common import LLAMA_3_1_8B, environment, write_json


def write_checkpoint(path: Path, hf: dict, device: str, dtype: torch.dtype) -> None:
    """A random Llama checkpoint of `hf`'s dims (weights N(0, 0.02), norms 1)."""
    import transformers

    keep = {k: v for k, v in hf.items() if k != "architectures"}
    config = transformers.LlamaConfig(**keep)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(path)
    del model


def time_batch(llm, batch: int, prompt: int, tokens: int, vocab: int) -> dict:
    from moska.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, vocab, (batch, prompt), generator=gen).tolist()
    times = {}
    for n in (1, 1 + tokens):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        times[n] = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
    decode_s = times[1 + tokens] - times[1]
    return {
        "batch": batch,
        "prefill_and_first_s": round(times[1], 4),
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": round(batch * tokens / decode_s, 1),
        "ms_per_step": round(decode_s / tokens * 1e3, 3),
        "first_tokens": [o.outputs[0].token_ids[:4] for o in outs[:2]],
    }


def run_tp(path: Path, variant: str, a, device: str, dtype: str, vocab: int):
    from moska.engine.llm import LLM

    tp, eager = int(variant.rstrip("el")), "e" in variant
    # "l": greedy steps gather the logits as before session 14 (rank 0 reads it at startup)
    os.environ["MOSKA_TP_ARGMAX_GATHER"] = "0" if "l" in variant else "1"
    kw = {"device": device, "dtype": dtype, "tensor_parallel_size": tp, "enforce_eager": eager,
          "max_num_seqs": max(a.batch + a.profile_batch), "max_model_len": a.prompt + a.tokens + 8}  # fmt: skip
    if a.profile:  # room for the steady run's ramp, timed and profiled steps
        kw["max_model_len"] += a.steady_steps + a.profile_steps + 24
    if device == "cpu":
        kw["num_kv_blocks"] = 256
    rows = []
    with LLM(str(path), **kw) as llm:
        # every bucket's graph before timing, as `moska serve` does (0 when eager)
        ahead = llm.engine.capture_graphs(progress=False)
        time_batch(llm, min(a.batch), a.prompt, 2, vocab)  # warm-up: compile
        for b in a.batch:
            g = llm.engine.runner.graphs
            replays, captures = getattr(g, "replays", None), getattr(g, "captures", 0)
            row = {"tp": variant, **time_batch(llm, b, a.prompt, a.tokens, vocab)}
            g = llm.engine.runner.graphs  # None if a capture failed (eager from then on)
            row["graphs"] = {
                "kind": type(g).__name__ if g is not None else None,
                "captured_before_timing": ahead,
                "captured": getattr(g, "captures", 0) - captures,
                # decode steps replayed (counted under TP only)
                "replays": None if replays is None else getattr(g, "replays", 0) - replays,
            }
            print(row, flush=True)
            rows.append(row)
        steady = []
        for b in a.profile_batch if a.profile else []:
            from tp_profile import steady_decode

            n = kw["max_model_len"] - a.prompt
            try:
                s = {"tp": variant, **steady_decode(llm, b, a.prompt, vocab, n, a.steady_steps,
                                                    a.profile_steps)}  # fmt: skip
            except Exception as e:  # noqa: BLE001 - the generate() rows above still count
                print("steady failed:", variant, b, repr(e), flush=True)
                steady.append({"tp": variant, "batch": b, "error": repr(e)})
                break  # the engine may be in a bad state
            brief = {k: v for k, v in s.items() if k != "profile"}
            print("steady:", brief, flush=True)
            for key in ("top_self_cpu", "top_self_device"):
                for r in s.get("profile", {}).get(key, [])[:8]:
                    print(f"  {key} tp={variant} b={b}:", r, flush=True)
            steady.append(s)
    return rows, steady


def _steady_summary(steady: list[dict], base: str) -> dict:
    """Steady decode ms per step, its speed-up over the baseline variant, and the split."""
    steady = [s for s in steady if "error" not in s]
    if not steady:
        return {}
    ms = {(s["tp"], s["batch"]): s["ms_per_step_median"] for s in steady}
    return {
        "steady_ms_per_step": {f"tp{t}_b{b}": v for (t, b), v in ms.items()},
        "steady_speedup_vs_tp1": {f"tp{t}_b{b}": round(ms[(base, b)] / v, 3)
                                  for (t, b), v in ms.items() if t != base and (base, b) in ms},
        "steady_split_ms": {f"tp{s['tp']}_b{s['batch']}": s["split_ms_median"] for s in steady},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tp",
        nargs="+",
        default=["1", "2", "2e"],
        help="variants: N ranks, 'e': enforce_eager, 'l': greedy steps gather the logits "
        "(not the argmax: the code before session 14); the first is the baseline",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--layers", type=int, default=8, help="of Llama-3.1-8B's 32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny dims, gloo, 2 ranks")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--profile", action="store_true", help="steady steps, split, torch.profiler")
    ap.add_argument("--profile-batch", type=int, nargs="+", default=None, help="default: max")
    ap.add_argument("--steady-steps", type=int, default=32)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dry = a.cpu_dry_run
    device = "cpu" if dry else "cuda"
    dtype = "float32" if dry else "bfloat16"
    hf = {**LLAMA_3_1_8B, "num_hidden_layers": a.layers}
    if dry:
        hf.update(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512, num_hidden_layers=2)  # fmt: skip
        a.batch, a.tokens, a.prompt = [1, 4], 4, 16
        a.steady_steps, a.profile_steps = min(a.steady_steps, 6), min(a.profile_steps, 2)
        a.tp = [v for v in a.tp if "e" not in v]  # CPU: TP is eager anyway
    if a.vocab:
        hf["vocab_size"] = a.vocab
    a.profile_batch = a.profile_batch or [max(a.batch)]
    with tempfile.TemporaryDirectory(prefix="moska-tp-") as tmp:
        path = Path(tmp) / "model"
        write_checkpoint(path, hf, device, getattr(torch, dtype))
        rows: list[dict] = []
        steady: list[dict] = []
        for tp in a.tp:  # the JSON after each variant: a run cut short keeps what it measured
            more, more_steady = run_tp(path, tp, a, device, dtype, hf["vocab_size"])
            rows, steady = rows + more, steady + more_steady
            result = _result(a, hf, device, dtype, rows, steady)
            if a.out:
                write_json(a.out, result)
    print("summary:", json.dumps(result["summary"]))
    if a.out:
        print("wrote", a.out)


def _result(a, hf: dict, device: str, dtype: str, rows: list, steady: list) -> dict:
    by = {(r["tp"], r["batch"]): r for r in rows}
    base, done = a.tp[0], [tp for tp in a.tp if any(k[0] == tp for k in by)]
    tok_s = {k: r["decode_tokens_per_s"] for k, r in by.items()}
    speedup = {f"tp{tp}_b{b}": round(tok_s[(tp, b)] / tok_s[(base, b)], 3)
               for tp in done if tp != base for b in a.batch}  # fmt: skip
    ms = {f"tp{tp}_b{b}": r["ms_per_step"] for (tp, b), r in by.items()}
    same = all(by[(tp, b)]["first_tokens"] == by[(base, b)]["first_tokens"] for tp, b in by)
    return {
        "bench": "tp_decode",
        "env": environment(),
        "device": device,
        "dtype": dtype,
        "model": {"dims": "Llama-3.1-8B", "layers": hf["num_hidden_layers"], "random": True},
        "shapes": {"prompt": a.prompt, "decode_tokens": a.tokens, "batches": a.batch},
        "rows": rows,
        "steady": steady,
        "summary": {
            "decode_speedup_vs_tp1": speedup,
            "ms_per_step": ms,
            "greedy_first_tokens_equal": same,
            **_steady_summary(steady, base),
            "target": "TP = 2 >= 1.7x TP = 1 tokens/s at B = 256 (issue 24)",
        },
    }


if __name__ == "__main__":
    main()
