"""Train a small MHA Llama code language model from scratch (#21 item 2: KV-head compression
starts from MHA, so it is measured on a model with as many KV heads as query heads).

Text: the ``.py`` files of this Python installation (standard library and site-packages),
files <= 200 KB, leaving out the held-out packages (networkx, sympy; moska.bench.heldout) and
scikit-learn, tokenized with the quality model's tokenizer (``.models/tok-code``, vocab 8,192:
its post-processor puts BOS = 0 before each file), packed into one stream. 1 % of the stream
(its end) is kept out of training for a validation loss. Random windows of ``--context + 1``
tokens are drawn from the stream on the device each step. transformers' LlamaForCausalLM,
bf16 autocast on CUDA, AdamW, linear warmup then a cosine over the run (steps or wall time,
whichever runs out first). Saves HF format (bf16 by default, tied embeddings, 8 MB shards),
the tokenizer files, and ``train_log.json`` (loss curve, tokens seen).

GPU (3.5 minutes on one H200; bench/device_session18_mha_code.sh):
    python -m moska.bench.train_code_lm --tokenizer .models/tok-code --out DIR --max-minutes 3.5
CPU check (toy sizes, seconds):
    python -m moska.bench.train_code_lm --cpu-dry-run --out /tmp/code-lm
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import random
import shutil
import sysconfig
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moska.bench.heldout import MAX_FILE_BYTES
from moska.bench.heldout import PACKAGES as HELDOUT

EXCLUDED = (*HELDOUT, "sklearn", "scikit_learn")  # top-level names under site-packages
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def corpus_files(roots: list[Path] | None = None) -> list[Path]:
    """The installation's ``.py`` files <= MAX_FILE_BYTES, without the excluded packages,
    sorted (deterministic); ``roots`` default: stdlib and site-packages."""
    if roots is None:
        paths = sysconfig.get_paths()
        roots = sorted({Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])})
    seen: set[Path] = set()
    out = []
    for root in roots:
        for p in root.rglob("*.py"):
            rel = p.relative_to(root).parts
            # site-packages under stdlib (lib/python3.x/site-packages): skip the excluded there too
            if any(part.split("-")[0] in EXCLUDED for part in rel[:-1]):
                continue
            try:
                if not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
                    continue
                real = p.resolve()
            except OSError:
                continue
            if real not in seen:
                seen.add(real)
                out.append(p)
    return sorted(out)


def read_texts(files: list[Path], max_mb: float, seed: int):
    """Shuffled files' texts, up to ``max_mb`` MB in all (unreadable ones skipped)."""
    files = list(files)
    random.Random(seed).shuffle(files)
    size = 0
    for f in files:
        if size >= max_mb * 1e6:
            return
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size += len(text)
        yield text


class TokenStream(threading.Thread):
    """Tokenizes the corpus in chunks of ``chunk_mb`` in the background (the tokenizer's Rust
    code releases the GIL), so that training starts after the first chunk: ``chunks`` gets
    one int32 tensor per chunk (BOS = 0 before each file: the tokenizer's post-processor)."""

    def __init__(self, tokenizer_dir: Path, files: list[Path], max_mb: float, seed: int,
                 chunk_mb: float = 8.0) -> None:  # fmt: skip
        super().__init__(daemon=True)
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.texts = read_texts(files, max_mb, seed)
        self.chunk_chars = int(chunk_mb * 1e6)
        self.chunks: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            batch: list[str] = []
            for text in self.texts:
                batch.append(text)
                if sum(map(len, batch)) >= self.chunk_chars:
                    self.chunks.put(self._encode(batch))
                    batch = []
            if batch:
                self.chunks.put(self._encode(batch))
        except BaseException as e:  # noqa: BLE001 - handed to the training loop
            self.error = e
        self.chunks.put(None)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for enc in self.tok.encode_batch(texts, add_special_tokens=True):
            if not enc.ids or enc.ids[0] != 0:
                raise ValueError("the tokenizer did not put BOS (id 0) before the file")
            ids.extend(enc.ids)
        return torch.tensor(ids, dtype=torch.int32)


def model_config(args, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate or 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,  # MHA
        "head_dim": args.head_dim,
        "max_position_embeddings": 2 * args.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows [n, length] of the stream (int64, on the stream's device)."""
    starts = torch.randint(0, len(stream) - length, (n,), generator=gen, device="cpu")
    idx = starts.to(stream.device)[:, None] + torch.arange(length, device=stream.device)
    return stream[idx].long()


def lr_at(args, step: int, progress: float) -> float:
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * min(1.0, step / args.warmup) * (args.min_lr + (1 - args.min_lr) * cos)


@torch.no_grad()
def val_loss(model, val: torch.Tensor, context: int, amp: bool) -> float:
    """Mean next-token loss over consecutive windows of the validation stream (<= 8)."""
    model.eval()
    n = min(8, (len(val) - 1) // context)
    if n < 1:
        model.train()
        return float("nan")
    x = val[: n * context + 1]
    ids = torch.stack([x[i * context : (i + 1) * context + 1] for i in range(n)]).long()
    with torch.autocast(val.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    model.train()
    return float(loss)


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    amp = device.type == "cuda"
    t_start = time.perf_counter()
    files = corpus_files([Path(r) for r in args.roots] if args.roots else None)
    reader = TokenStream(Path(args.tokenizer), files, args.corpus_mb, args.seed, args.chunk_mb)
    reader.start()
    first = reader.chunks.get()
    if first is None:
        raise SystemExit(f"no corpus text ({reader.error})")
    # validation: the first chunk's last 1 % (whole files of the shuffled order, never trained on)
    n_val = max(args.context * 8 + 1, len(first) // 100)
    if len(first) < 2 * n_val:
        raise SystemExit(f"first corpus chunk too small: {len(first)} tokens")
    train_s, val_s = first[:-n_val].to(device), first[-n_val:].to(device)
    corpus = {"files_available": len(files), "first_chunk_tokens": len(first),
              "val_tokens": n_val, "max_mb": args.corpus_mb, "excluded": list(EXCLUDED),
              "first_chunk_seconds": round(time.perf_counter() - t_start, 1)}  # fmt: skip
    print(json.dumps({"corpus": corpus}), flush=True)
    chunks, reading = 1, True
    vocab = json.loads((Path(args.tokenizer) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.resume:
        model = LlamaForCausalLM.from_pretrained(args.resume)
        model = model.float()
        print(f"resumed from {args.resume}", flush=True)
    else:
        model = LlamaForCausalLM(LlamaConfig(**model_config(args, vocab)))
    # transformers types its wrapped `.to` as taking the model first: the checker is wrong
    model = model.to(device)  # type: ignore[arg-type]
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=args.lr, betas=(0.9, 0.95), fused=amp,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    log: list[dict] = []
    prior = _prior_tokens(Path(args.resume)) if args.resume else 0
    t0 = time.perf_counter()
    limit = args.max_minutes * 60 if args.max_minutes else math.inf
    tokens, ema = 0, None
    for step in range(1, args.steps + 1):
        progress = max(step / args.steps, (time.perf_counter() - t0) / limit)
        lr = lr_at(args, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        while reading and not reader.chunks.empty():  # the stream grows as chunks arrive
            more = reader.chunks.get()
            if more is None:
                reading = False
            else:
                train_s, chunks = torch.cat([train_s, more.to(device)]), chunks + 1
        ids = windows(train_s, args.batch, args.context + 1, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids[:, 1:].numel()
        last = step >= args.steps or time.perf_counter() - t0 > limit
        if step % args.log_every == 0 or last:
            cur = loss.item()
            ema = cur if ema is None else 0.5 * ema + 0.5 * cur
            row = {"step": step, "loss": round(cur, 4), "val_loss": None, "lr": round(lr, 6),
                   "tokens": tokens, "tokens_total": prior + tokens, "corpus_tokens": len(train_s),
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            if step % (args.log_every * 10) == 0 or last:
                row["val_loss"] = round(val_loss(model, val_s, args.context, amp), 4)
            log.append(row)
            print(json.dumps(row), flush=True)
        if last:
            break
    seconds = time.perf_counter() - t0
    corpus.update(train_tokens=len(train_s), chunks=chunks, read_all=not reading)
    summary = {"steps": log[-1]["step"] if log else 0, "tokens": tokens,
               "tokens_total": prior + tokens, "train_seconds": round(seconds, 1),
               "tokens_per_second": round(tokens / max(seconds, 1e-9)),
               "final_loss": log[-1]["loss"] if log else None,
               "final_val_loss": log[-1]["val_loss"] if log else None,
               "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    _save(model, out, args, {"args": vars(args), "corpus": corpus, "summary": summary, "log": log})
    return summary


def _prior_tokens(src: Path) -> int:
    try:
        return int(json.loads((src / "train_log.json").read_text())["summary"]["tokens_total"])
    except (OSError, KeyError, ValueError):
        return 0


def _save(model, out: Path, args, log: dict) -> None:
    """HF format in ``--save-dtype`` (tied: no lm_head tensor), tokenizer files, train log."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.save_dtype)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # fmt: skip
    # shards of 8 MB: a device run's files come back only below ~17 MB each
    model.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size="8MB")
    cfg = json.loads((out / "config.json").read_text())  # transformers states the live dtype
    cfg["dtype"] = args.save_dtype
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(args.tokenizer) / name).is_file():
            shutil.copyfile(Path(args.tokenizer) / name, out / name)
    if args.resume and (Path(args.resume) / "train_log.json").is_file():
        log["before_resume"] = json.loads((Path(args.resume) / "train_log.json").read_text())
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="train_code_lm", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write (HF format)")
    ap.add_argument("--tokenizer", default=".models/tok-code", help="tokenizer + config folder")
    ap.add_argument("--roots", nargs="*", default=None,
                    help="folders of .py files (default: stdlib and site-packages)")  # fmt: skip
    ap.add_argument("--corpus-mb", type=float, default=300.0, help="text to tokenize, MB")
    ap.add_argument("--chunk-mb", type=float, default=8.0,
                    help="text per tokenized chunk (training starts after the first)")  # fmt: skip
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4, help="query heads = KV heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="windows per step")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=0.1, help="final lr, a share of --lr")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--resume", default=None, help="start from this HF model folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.corpus_mb, args.context, args.hidden = "cpu", 0.3, 128, 64
        args.chunk_mb = 0.1
        args.layers, args.heads, args.head_dim, args.batch = 2, 4, 16, 4
        args.steps, args.log_every, args.warmup, args.max_minutes = 8, 4, 2, None
        args.save_dtype = "float32"
    print(json.dumps(train(args)), flush=True)


if __name__ == "__main__":
    main()
