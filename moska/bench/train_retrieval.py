"""Train a small Llama-style model from scratch on synthetic long-context retrieval
(moska.bench.retrieval_tasks) and save it in Hugging Face format, with the task's spec, for
`moska bench fidelity --retrieval-model DIR`.

Each training sequence is one context followed by as many questions as it has facts, drawn
with replacement (asked once each, the last ones were answered by elimination: see batch()),
each with its answer. The loss is on the answer tokens. ``--key-targets`` adds the question's
later key tokens and ``--lm-weight`` the loss on every next token (which holds those key lookups
too): both are off by default, since on CPU the key targets kept the loss at the uniform
floor for 1,000 steps where the answers alone began to learn. Contexts start at
``--start-context`` and double once the answers are learnt (training answer-token accuracy
>= ``--advance-at``) up to ``--context``: the lookup has to emerge on short contexts (it does
so only after a plateau), then stretch.
Batches are made in DataLoader workers (numpy): made in the training loop, they were the GPU
run's whole cost. bf16 autocast on CUDA.

GPU (6 minutes of training on one H200; the output folder is git-ignored):
    python -m moska.bench.train_retrieval --out .models/retrieval-4k --context 4096 \
        --steps 30000 --max-minutes 6 --batch 16 --log-every 250 --save-dtype bfloat16
CPU check (toy; it checks that training runs, it is too short for the lookup to emerge):
    python -m moska.bench.train_retrieval --cpu-dry-run --out /tmp/ret
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moska.bench.retrieval_tasks import RetrievalSpec, context_array


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
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


KEY, ANSWER = 1, 2  # batch() mask values: a lookup of a question's key token, an answer


def batch(spec: RetrievalSpec, rng: random.Random, size: int, questions: int, keys: bool = True):
    """(ids [B, T], target mask [B, T], lengths [B]) of contexts followed by ``questions``
    questions (0: every fact) and their answers, right-padded with BOS. ``mask[b, t]`` marks
    the tokens to predict (from position t - 1): ANSWER for the answer tokens and, with
    ``keys``, KEY for the question's key tokens after its first and its separator (each the
    token that followed the previous one in the context: more supervision for the lookup the
    answer needs; ambiguous where a key token recurs, so never a measure of accuracy)."""
    rows, masks = [], []
    for _ in range(size):
        ctx, facts = context_array(rng, spec, 0)
        # drawn with replacement: asked without, the last questions are answered by
        # elimination (a value of the context not yet given), which the model learnt instead
        # of the lookup (training token accuracy 0.72-0.88 at 128-1,024 tokens, no lookup)
        qs = [rng.choice(facts) for _ in range(questions or len(facts))]
        tail, mask = [], [np.zeros(len(ctx), dtype=np.int8)]
        for q, a, _, _ in qs:
            tail += q + a
            ask = [0] * 3 + [KEY * keys] * (len(q) - 3)  # QUESTION, marker, k1 | k2 k3 sep
            mask.append(np.array(ask + [ANSWER] * len(a), dtype=np.int8))
        rows.append(np.concatenate([ctx, np.array(tail, dtype=ctx.dtype)]))
        masks.append(np.concatenate(mask))
    lengths = [len(r) for r in rows]
    ids = np.zeros((size, max(lengths)), dtype=np.int64)
    m = np.zeros(ids.shape, dtype=np.int8)
    for i, (r, k) in enumerate(zip(rows, masks)):
        ids[i, : len(r)], m[i, : len(k)] = r, k
    return torch.from_numpy(ids), torch.from_numpy(m), torch.tensor(lengths)


class Batches(torch.utils.data.IterableDataset):
    """Endless training batches at the curriculum's current context (a shared value the
    training loop raises), made in DataLoader workers so that the GPU does not wait on
    Python."""

    def __init__(self, full: RetrievalSpec, args, context) -> None:
        self.full, self.args, self.context = full, args, context

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.args.seed * 1000 + (info.id if info else 0))
        a = self.args
        while True:
            ctx = self.context.value
            n = min(a.batch * 8, max(1, a.batch * a.context // ctx))
            spec = self.full.with_context(ctx)
            yield (ctx, *batch(spec, rng, n, a.questions, keys=a.key_targets))


def losses(logits, ids, m, lengths):
    """(lookup loss, next-token loss, answer token accuracy) of a batch's logits [B, T, V]."""
    logits, tgt, sel = logits[:, :-1].float(), ids[:, 1:], m[:, 1:]
    lookup = F.cross_entropy(logits[sel > 0], tgt[sel > 0])
    valid = torch.arange(tgt.shape[1], device=ids.device)[None] < (lengths[:, None] - 1)
    lm = F.cross_entropy(logits[valid], tgt[valid])
    ans = sel == ANSWER
    acc = (logits[ans].argmax(-1) == tgt[ans]).float().mean()
    return lookup, lm, acc


@torch.no_grad()
def accuracy(model, spec: RetrievalSpec, device, n: int, seed: int, amp: bool = False) -> float:
    """Teacher-forced exact match of the answers (every answer token the argmax), one
    question per context as the fidelity benchmark asks."""
    rng = random.Random(seed)
    hits = 0
    for lo in range(0, n, 16):  # 16 contexts at a time: the logits of a long batch are big
        ids, m, _ = batch(spec, rng, min(16, n - lo), 1, keys=False)
        ids, m = ids.to(device), m.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits[:, :-1]
        pred = logits.argmax(-1) == ids[:, 1:]
        hits += int((pred | (m[:, 1:] == 0)).all(dim=1).sum())
    return hits / n


def contexts(start: int, full: int) -> list[int]:
    """The curriculum's context lengths: ``start`` doubled up to ``full``."""
    out = [min(start, full)]
    while out[-1] < full:
        out.append(min(2 * out[-1], full))
    return out


def advances(stage: int, stages: int, ema: float, progress: float, args) -> bool:
    """Whether the curriculum moves to the next context: the answers are learnt (training
    answer accuracy ``ema`` >= ``args.advance_at``), or the stage learnt the lookup (ema >=
    0.8: above what copying any value of 2-4 facts gives) but stalls short of it, and its
    share of the run is used (by 80 % of the run the full context is trained on) — never
    before ``args.forced_after`` of the run (short runs: a 1.8-minute one left 64 tokens at
    14 s, ema 0.86, then each stage on time, and its MHA model ended at 0.1 answer accuracy
    at 2,048 tokens; H200, session 17)."""
    if stage + 1 >= stages:
        return False
    due = progress >= max(args.forced_after, 0.8 * (stage + 1) / stages) and ema >= 0.8
    return ema >= args.advance_at or due


def lr_at(args, step: int, progress: float) -> float:
    """Linear warmup, then a cosine to ``args.lr * args.min_lr`` over ``progress`` (the larger
    of the shares of steps and of time used)."""
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * min(1.0, step / args.warmup) * (args.min_lr + (1 - args.min_lr) * cos)


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    formats = tuple(args.formats.split(","))
    filler = args.vocab * 400 // 1024  # the default spec's split of ids, scaled
    kv = (args.vocab - 16 - filler) // 2
    full = RetrievalSpec(vocab_size=args.vocab, filler_tokens=filler, key_tokens=kv,
                         value_tokens=kv, context_tokens=args.context, facts=args.facts,
                         formats=formats, separators=args.separators)  # fmt: skip
    cfg = LlamaConfig(**model_config(full, args))
    torch.manual_seed(args.seed)
    if args.resume and (Path(args.out) / "config.json").is_file():  # a previous call's model
        model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
        print(f"resumed from {args.out}", flush=True)
    else:
        model = LlamaForCausalLM(cfg)
    # transformers types its wrapped `.to` as taking the model first: the checker is wrong
    model = model.to(device)  # type: ignore[arg-type]
    # no weight decay on embeddings and norms: decay pulls rarely seen key/value rows to 0
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    amp = device.type == "cuda"
    stages, stage, ema = contexts(args.start_context, args.context), 0, 0.0
    current = multiprocessing.Value("i", stages[0])  # read by the batch workers
    loader = torch.utils.data.DataLoader(
        Batches(full, args, current), batch_size=None, num_workers=args.workers,
        pin_memory=amp, prefetch_factor=2 if args.workers else None,
    )  # fmt: skip
    log: list[dict] = []
    t0 = time.perf_counter()
    limit = args.max_minutes * 60 if args.max_minutes else math.inf
    for step, (ctx, *tensors) in enumerate(loader, start=1):
        progress = max(step / args.steps, (time.perf_counter() - t0) / limit)
        lr = lr_at(args, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, m, lengths = (t.to(device, non_blocking=True) for t in tensors)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits
        lookup, lm, acc = losses(logits, ids, m, lengths)
        loss = lookup + args.lm_weight * lm if args.lm_weight else lookup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ctx == stages[stage]:  # batches made before the last advance are still arriving
            ema = 0.9 * ema + 0.1 * acc.item()
        grew = advances(stage, len(stages), ema, progress, args)
        if grew:
            stage, ema = stage + 1, 0.0
            current.value = stages[stage]
        last = step >= args.steps or time.perf_counter() - t0 > limit
        if step % args.log_every == 0 or last or grew:
            spec = full if last else full.with_context(ctx)
            row = _evaluate(model, spec, device, args.eval_n * (4 if last else 1), amp)
            row.update(step=step, loss=round(lookup.item(), 4), lm_loss=round(lm.item(), 4),
                       train_answer_acc=round(ema, 3), next_context=stages[stage],
                       lr=round(lr, 6), seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
            log.append(row)
            print(json.dumps(row), flush=True)
            # saved at each log step: a run cut short by its time limit keeps its latest model
            _save(model, full, Path(args.out), args, log)
        if last:
            break
    return {"out": args.out, "final": log[-1] if log else None}


def _evaluate(model, spec: RetrievalSpec, device, n: int, amp: bool) -> dict:
    model.eval()
    acc = accuracy(model, spec, device, n, seed=10**6, amp=amp)
    model.train()
    return {"context": spec.context_tokens, "answer_acc": round(acc, 4)}


def _save(model, full: RetrievalSpec, out: Path, args, log: list) -> None:
    """The model in HF format (in ``--save-dtype``: bf16 halves the file), its task spec and
    the training log."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.save_dtype)
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}  # fmt: skip
    # shards of 8 MB: a device run's files come back only below ~17 MB each
    model.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size="8MB")
    cfg = json.loads((out / "config.json").read_text())  # transformers states the live dtype
    cfg["dtype"] = args.save_dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    full.save(out)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="train_retrieval", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write (HF format)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--start-context", type=int, default=64,
                    help="first curriculum context (facts scale with it: 1 at 64 of 4,096 "
                    "tokens, so the copy is learnt before the choice among facts)")  # fmt: skip
    ap.add_argument("--facts", type=int, default=48, help="facts per full-length context")
    ap.add_argument("--vocab", type=int, default=1024, help="token ids (filler, keys, values)")
    ap.add_argument("--formats", default="fact,code,hop", help="comma-separated task formats")
    ap.add_argument(
        "--questions",
        type=int,
        default=0,
        help="per context, drawn with replacement; 0: as many as it has facts",
    )
    ap.add_argument(
        "--separators",
        action="store_true",
        help="the first task format (IS between key and value: not learnt)",
    )
    ap.add_argument("--steps", type=int, default=None, help="default 6000 (dry run 1500)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop (evaluate, save) after this much training time; the lr "
                    "schedule follows whichever of steps and time runs out first")  # fmt: skip
    ap.add_argument("--batch", type=int, default=16, help="full-length contexts per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=0.1, help="final lr, a share of --lr")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--lm-weight", type=float, default=0.0,
                    help="weight of the loss on every next token (0: lookups only)")  # fmt: skip
    ap.add_argument("--key-targets", action=argparse.BooleanOptionalAction, default=False,
                    help="also train on the question's key tokens (measured: they hold the "
                    "loss at the uniform floor; answers alone start to learn)")  # fmt: skip
    ap.add_argument("--advance-at", type=float, default=0.95,
                    help="training lookup accuracy at which the context doubles")  # fmt: skip
    ap.add_argument("--forced-after", type=float, default=0.0,
                    help="share of the run before which no stage is left on time alone "
                    "(short runs: let the lookup emerge at short contexts first)")  # fmt: skip
    ap.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=True,
                    help="output layer = input embeddings: copying a token is then one map "
                    "for all tokens, not one learnt per key/value token (measured on an H200: "
                    "untied models stalled at 64-128 tokens in 6 minutes, tied ones answered "
                    "every question at 4,096 tokens within 4; train_retrieval_sweep2_h200.json)")  # fmt: skip
    ap.add_argument("--resume", action="store_true",
                    help="start from the model already in --out (a run continued over "
                    "several device calls; the optimizer state starts afresh)")  # fmt: skip
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--workers", type=int, default=None,
                    help="batch-making processes (default 6 on CUDA, 0 on CPU)")  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        # the smallest setting in which the answers began to be learnt on CPU
        args.device, args.context, args.start_context, args.facts = "cpu", 64, 32, 4
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 2, 1
        args.batch, args.eval_n, args.log_every, args.lr = 8, 32, 250, 3e-3
        args.formats, args.workers, args.vocab = "fact,code", 0, 256
        args.steps = args.steps or 1500
    args.steps = args.steps or 6000
    if args.workers is None:
        args.workers = 6 if args.device.startswith("cuda") else 0
    train(args)


if __name__ == "__main__":
    main()
