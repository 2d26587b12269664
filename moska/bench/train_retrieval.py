"""Train a small Llama-style model from scratch on synthetic long-context retrieval
(moska.bench.retrieval_tasks) and save it in Hugging Face format, with the task's spec, for
`moska bench fidelity --retrieval-model DIR`.

Each training sequence is one context followed by several questions with their answers;
the loss is on the answer tokens and the question's later key tokens (both are lookups of
what followed a key in the context). Contexts grow from
``--start-context`` to ``--context`` over the first half of training (a curriculum: the
retrieval heads form on short contexts, then stretch). bf16 autocast on CUDA.

GPU (a few minutes on one H200; the output folder is git-ignored):
    python -m moska.bench.train_retrieval --out .models/retrieval-4k --context 4096 \
        --steps 3000 --batch 16
CPU check (toy): python -m moska.bench.train_retrieval --cpu-dry-run --out /tmp/ret
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moska.bench.retrieval_tasks import RetrievalSpec, make_context


def model_config(spec: RetrievalSpec, args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": 2 * spec.context_tokens,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0 if spec.context_tokens <= 1024 else 100000.0,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def batch(spec: RetrievalSpec, rng: random.Random, size: int, questions: int, keys: bool = True):
    """(ids [B, T], target mask [B, T]) of contexts followed by questions and answers. The
    targets are the answer tokens and, with ``keys``, the question's key tokens after its
    first (each a copy of the token that followed the previous one in the context: more
    supervision for the same induction lookup the answer needs)."""
    seqs, masks = [], []
    for _ in range(size):
        ctx, qs = make_context(rng, spec, questions)
        ids, mask = list(ctx), [0] * len(ctx)
        for q, a, _, _ in qs:
            ids += q + a
            ask = [0, 0, 0] + [int(keys)] * (len(q) - 3)  # QUESTION, marker, k1 | k2 k3 sep
            mask += ask + [1] * len(a)
        seqs.append(ids)
        masks.append(mask)
    T = max(len(s) for s in seqs)
    ids_t = torch.zeros(size, T, dtype=torch.long)
    m = torch.zeros(size, T, dtype=torch.bool)
    for i, (s, k) in enumerate(zip(seqs, masks)):
        ids_t[i, : len(s)] = torch.tensor(s)
        m[i, : len(k)] = torch.tensor(k, dtype=torch.bool)
    return ids_t, m


@torch.no_grad()
def accuracy(model, spec: RetrievalSpec, device, n: int, seed: int) -> float:
    """Teacher-forced exact match of the answers (every answer token the argmax)."""
    rng = random.Random(seed)
    ids, m = batch(spec, rng, n, 1, keys=False)
    ids, m = ids.to(device), m.to(device)
    logits = model(input_ids=ids).logits[:, :-1]
    pred = logits.argmax(-1) == ids[:, 1:]
    target = m[:, 1:]
    return float(((pred | ~target).all(dim=1)).float().mean())


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    full = RetrievalSpec(context_tokens=args.context, facts=args.facts)
    cfg = LlamaConfig(**model_config(full, args))
    torch.manual_seed(args.seed)
    # transformers types its wrapped `.to` as taking the model first: the checker is wrong
    model = LlamaForCausalLM(cfg).to(device)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    amp = device.type == "cuda"
    log = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        grow = min(1.0, step / max(1, args.steps // 2))
        ctx = int(args.start_context + grow * (args.context - args.start_context))
        spec = full.with_context(max(64, ctx // 64 * 64))
        lr = (
            args.lr
            * min(1.0, step / args.warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / args.steps))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        tokens = max(1, args.batch * args.context // max(spec.context_tokens, 1))
        ids, m = batch(spec, rng, min(tokens, args.batch * 8), args.questions)
        ids, m = ids.to(device), m.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits[m[:, 1:]], ids[:, 1:][m[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                acc = accuracy(model, spec, device, args.eval_n, seed=10**6 + step)
            model.train()
            row = {"step": step, "context": spec.context_tokens, "loss": round(loss.item(), 4),
                   "answer_acc": acc, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            log.append(row)
            print(json.dumps(row), flush=True)
            # saved at each log step: a run cut short by its time limit keeps its latest model
            _save(model, full, Path(args.out), args, log)
    out = Path(args.out)
    _save(model, full, out, args, log)
    return {"out": str(out), "final": log[-1] if log else None}


def _save(model, full: RetrievalSpec, out: Path, args, log: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    full.save(out)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="train_retrieval", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write (HF format)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--start-context", type=int, default=256)
    ap.add_argument("--facts", type=int, default=48, help="facts per full-length context")
    ap.add_argument("--questions", type=int, default=8, help="questions per training context")
    ap.add_argument("--steps", type=int, default=None, help="default 3000 (300 dry run)")
    ap.add_argument("--batch", type=int, default=16, help="full-length contexts per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.context, args.start_context, args.facts = "cpu", 256, 128, 6
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 2, 1
        args.batch, args.eval_n, args.log_every = 8, 32, 50
        args.steps = args.steps or 300
    args.steps = args.steps or 3000
    train(args)


if __name__ == "__main__":
    main()
