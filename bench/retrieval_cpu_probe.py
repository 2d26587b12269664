"""Issue 17: small CPU probes of why retrieval training stalled (one thread; minutes each).

Trains a tiny Llama on moska.bench.retrieval_tasks batches (moska.bench.train_retrieval.batch:
questions drawn with replacement) and reports, on held-out contexts with one question each,
the exact match and the accuracy of the answer's first and second token separately: a model
that copies "some value" of the context gets the second token (a one-token copy) long before
the first (the key lookup). ``--elimination`` prints instead what answering by elimination
(a value of the context not yet given, then its successor) scores when every fact is asked
once, per curriculum length: the accuracies the stalled H200 runs sat at.
    python bench/retrieval_cpu_probe.py --elimination
    python bench/retrieval_cpu_probe.py --ctx 64 --facts 4 --steps 1500 [--sep]
"""

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from moska.bench import retrieval_tasks as rt
from moska.bench.train_retrieval import ANSWER, batch


def elimination() -> None:
    full = rt.RetrievalSpec(separators=True)
    for tokens in (128, 256, 512, 1024, 2048, 4096):
        spec, rng = full.with_context(tokens), random.Random(0)
        lo, hi = spec.value_range
        tok = n = first = 0.0
        for _ in range(300):
            c, qs = rt.make_context(rng, spec, 0)  # every fact asked once, as before
            firsts = [c[i] for i in range(len(c) - 1) if lo <= c[i] < hi and lo <= c[i + 1] < hi]
            used: set = set()
            for j, (_, a, _, _) in enumerate(qs):
                cand = [v for v in firsts if v not in used] or firsts
                p = cand.count(a[0]) / len(cand)
                tok, n = tok + p + 1, n + 2
                first += p if j == 0 else 0
                used.add(a[0])
        row = {"context": tokens, "facts": spec.facts, "token_acc": round(tok / n, 3),
               "first_question_exact": round(first / 300, 3)}  # fmt: skip
        print(json.dumps(row))


def probe(a) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    filler = a.vocab * 400 // 1024
    kv = (a.vocab - 16 - filler) // 2
    spec = rt.RetrievalSpec(vocab_size=a.vocab, filler_tokens=filler, key_tokens=kv,
                            value_tokens=kv, context_tokens=a.ctx, facts=a.facts,
                            formats=tuple(a.formats.split(",")), separators=a.sep)  # fmt: skip
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, head_dim=a.hidden // a.heads,
                      max_position_embeddings=4096, vocab_size=a.vocab)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, t0, ema = random.Random(a.seed), time.time(), 0.0
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1, step / 50)
        ids, m, _ = batch(spec, rng, a.bs, 0, keys=a.key_targets)
        logits = model(input_ids=ids).logits[:, :-1]
        tgt, sel = ids[:, 1:], m[:, 1:] == ANSWER
        loss = F.cross_entropy(logits[m[:, 1:] > 0], tgt[m[:, 1:] > 0])
        ema = 0.9 * ema + 0.1 * (logits[sel].argmax(-1) == tgt[sel]).float().mean().item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps:
            row = {"step": step, "loss": round(loss.item(), 3), "train_tok": round(ema, 3)}
            print(json.dumps({**row, **evaluate(model, spec), "s": round(time.time() - t0)}))


@torch.no_grad()
def evaluate(model, spec, n: int = 128) -> dict:
    model.eval()
    r, hits, t1, t2 = random.Random(999), 0, 0, 0
    for _ in range(0, n, 32):
        ids, m, _ = batch(spec, r, 32, 1, keys=False)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1) == ids[:, 1:]
        ans = m[:, 1:] == ANSWER
        hits += int((pred | ~ans).all(1).sum())
        pos, rows = ans.float().argmax(1), torch.arange(len(ids))
        t1, t2 = t1 + int(pred[rows, pos].sum()), t2 + int(pred[rows, pos + 1].sum())
    model.train()
    return {"exact": hits / n, "tok1": t1 / n, "tok2": t2 / n}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elimination", action="store_true")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--formats", default="fact,code")
    ap.add_argument("--sep", action="store_true", help="the first format (separators)")
    ap.add_argument("--key-targets", action="store_true", help="loss on question keys too")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    elimination() if args.elimination else probe(args)
