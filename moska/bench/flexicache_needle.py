"""A needle test for FlexiCache (#21: "the needle test of the kernels issue where it
applies"): does a stable head's top-K page ranking keep the one page a late line needs?

The kernels issue's needle test (`kernels_router_needle.py`) asks whether a top-k selection
of chunks keeps the chunk that holds a planted key. FlexiCache makes the same kind of choice
per KV head over 16-token pages (ranked by each page's mean key, `rank=centroid`), so here it
is asked of the model itself: held-out code windows (moska-code-20m's training length,
2,048 tokens) get a definition line `_CACHE_KEY_i = "<12 random hex digits>"` inserted
after a newline 256-1,024 tokens in (past the sink page), and end with the line
`assert _CACHE_KEY_i == "<the same digits>"`. The window's last `--decode` tokens are
decoded through the engine, teacher-forced (as `flexicache_engine_quality.py`), so the
request has been handed off (older pages in host memory, stable heads reading their top-K)
and re-ranked many times when the assert line comes. Scored: the value's tokens and its
closing quote in the assert line (log-probability and arg-max hits), with full KV (the dense
forward, which the engine's full KV equals: that bench checks it every run), with FlexiCache,
and with a control whose definition holds other digits (what the model does without the
needle). `needle_kept` = (control NLL - FlexiCache NLL) / (control NLL - full-KV NLL): 1 when
FlexiCache copies the value as full KV does, 0 when it does no better than without it.

Usage: python -m moska.bench.flexicache_needle [--flexicache on] [--windows 4]
           [--decode 256] [--cpu-dry-run] [--out ...json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from moska.bench.common import environment, write_json
from moska.bench.flexicache_engine_quality import engine_loss
from moska.bench.heldout import PACKAGES, heldout_windows

ROOT = Path(__file__).resolve().parents[2]
HEX = "0123456789abcdef"


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without the document-start token the code tokenizer adds."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def needle_window(
    tokenizer, window: list[int], name: str, value: str, defined: str, at: int, before: int
) -> tuple[list[int], list[int], int]:
    """(ids, scored positions, definition's position): `window` with the line
    `name = "defined"` inserted after the first token ending a line at or past token `at` (ValueError
    unless that is before token `before`), cut so that `assert name == "value"` ends it at
    the window's length. Scored: the positions of the value's tokens and the closing quote
    (the tokens after `== "`)."""
    definition = _encode(tokenizer, f'\n{name} = "{defined}"\n')
    head = _encode(tokenizer, f'\nassert {name} == "')
    line = _encode(tokenizer, f'\nassert {name} == "{value}"\n')
    if line[: len(head)] != head:
        raise ValueError(f"the assert line does not tokenize with its head first: {line}")
    p = at
    while p < len(window) and not tokenizer.decode([window[p]]).endswith("\n"):
        p += 1  # a line's end (code tokens join a newline with the next line's indent)
    if p >= min(before, len(window) - len(definition) - len(line)):
        raise ValueError(f"no newline in tokens [{at}, {before}) to insert the definition after")
    body = (window[: p + 1] + definition + window[p + 1 :])[: len(window) - len(line)]
    ids = body + line
    scored = list(range(len(body) + len(head), len(ids) - 1))  # the value and its quote
    return ids, scored, p + 1


@torch.inference_mode()
def dense_scores(model, ids: list[int], scored: list[int]) -> tuple[list[float], list[bool]]:
    """Log-probabilities and arg-max hits of ids at `scored`, dense full attention."""
    from moska.model import DenseAttention

    x = torch.tensor(ids)
    h = model(x, torch.arange(len(ids)), DenseAttention(model.config.sm_scale))
    pos = torch.tensor(scored)
    logp = torch.log_softmax(model.compute_logits(h[pos - 1]).float(), -1)
    target = x[pos]
    return logp.gather(1, target[:, None])[:, 0].tolist(), (logp.argmax(-1) == target).tolist()


def summarize(
    name: str, logprobs: list[list[float]], top1: list[list[bool]], rest: list[float] | None
) -> dict:
    """A setting's needle figures; rest: its log-probabilities at the other decoded
    positions (the windows' ordinary code), whose mean NLL is `other_nll`."""
    flat = [lp for w in logprobs for lp in w]
    hits = [h for w in top1 for h in w]
    return {
        "setting": name,
        **({"other_nll": -sum(rest) / len(rest)} if rest else {}),
        "needle_nll": -sum(flat) / len(flat),
        "needle_top1": sum(hits) / len(hits),
        "windows_all_top1": sum(all(w) for w in top1),
        "per_window_nll": [-sum(w) / len(w) for w in logprobs],
    }


def kept_share(control: float, full: float, got: float) -> float | None:
    """How much of the needle's NLL benefit (control - full) a setting keeps."""
    gap = control - full
    return None if gap <= 0 else (control - got) / gap


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--flexicache", default="on", help="the --flexicache setting measured")
    ap.add_argument(
        "--also", action="append", default=[],
        help="another setting (repeatable); 'full': the engine with full KV (no FlexiCache)",
    )  # fmt: skip
    ap.add_argument("--windows", type=int, default=4, help="windows per held-out package")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=256, help="tokens decoded per window")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    spec, device = a.flexicache, "cpu" if a.cpu_dry_run else a.device
    at = (256, 1024)
    if a.cpu_dry_run:  # short windows, small pages and K: the pipeline, not a figure
        a.length, a.decode, a.windows, a.block_size, at = 384, 96, 1, 4, (40, 120)
        spec = "k=4,recent=1,sink=1,threshold=0.5,r=4"
    from moska.model import load_model

    t0 = time.perf_counter()
    lm = load_model(a.model, dtype="float32", device=device)
    rng = random.Random(a.seed)
    by_pkg = heldout_windows(lm.tokenizer, a.length, a.windows, a.seed)
    prompt = a.length - a.decode
    wins: list[list[int]] = []
    scored: list[list[int]] = []
    controls: list[list[int]] = []
    defs: list[int] = []
    for i, w in enumerate(x for ws in by_pkg.values() for x in ws):
        value = "".join(rng.choice(HEX) for _ in range(12))
        other = "".join(rng.choice(HEX) for _ in range(12))
        where = rng.randrange(*at)
        ids, pos, d = needle_window(lm.tokenizer, list(map(int, w)), f"_CACHE_KEY_{i}",
                                    value, value, where, at[1] + 128)  # fmt: skip
        ctrl, _, _ = needle_window(lm.tokenizer, list(map(int, w)), f"_CACHE_KEY_{i}",
                                   value, other, where, at[1] + 128)  # fmt: skip
        wins.append(ids)
        scored.append(pos)
        controls.append(ctrl)
        defs.append(d)
    assert all(p >= prompt + a.decode // 2 for pos in scored for p in pos), "assert too early"
    assert max(defs) < prompt - a.decode, "definition too late: it must be offloaded"
    decoded = list(range(prompt, a.length))
    dense = [dense_scores(lm.model, w, decoded) for w in wins]  # every decoded position
    bare = [dense_scores(lm.model, w, s) for w, s in zip(controls, scored)]
    del lm

    def split(lps: list[list[float]], hits: list[list[bool]]) -> tuple[list, list, list]:
        """(needle log-probs, needle hits, other log-probs) from per-decoded-position lists."""
        at = [[p - prompt for p in s] for s in scored]
        need = [[w[i] for i in ix] for w, ix in zip(lps, at)]
        need_hits = [[w[i] for i in ix] for w, ix in zip(hits, at)]
        other = [lp for w, ix in zip(lps, at) for i, lp in enumerate(w) if i not in set(ix)]
        return need, need_hits, other

    rows = [
        summarize("full KV (dense)", *split([d[0] for d in dense], [d[1] for d in dense])),
        summarize("control (other value defined)", [c[0] for c in bare], [c[1] for c in bare],
                  None),
    ]  # fmt: skip
    engines = {}
    for setting in [spec, *a.also]:
        engine_spec = None if setting == "full" else setting
        got = engine_loss(a.model, wins, prompt, engine_spec, a.block_size, device, per_window=True)
        per = got.pop("per_window")
        label = "engine full KV" if engine_spec is None else f"flexicache {setting}"
        rows.append(
            summarize(label, *split([w["logprobs"] for w in per], [w["top1"] for w in per]))
        )
        engines[setting] = got
        print(rows[-1], file=sys.stderr, flush=True)
        full_nll, ctrl_nll = rows[0]["needle_nll"], rows[1]["needle_nll"]
        rows[-1]["needle_kept"] = kept_share(ctrl_nll, full_nll, rows[-1]["needle_nll"])
        result = {
            "environment": environment(), "model": Path(a.model).name, "device": device,
            "dtype": "float32", "flexicache": spec,
            "shapes": {"windows": len(wins), "length": a.length, "prompt": prompt,
                       "decoded_per_window": a.decode, "block_size": a.block_size,
                       "definition_at": defs, "scored_per_window": [len(s) for s in scored]},
            "heldout": {p: f"{a.windows} windows x {a.length} tokens" for p in PACKAGES},
            "what": __doc__.split("\n\n")[1].replace("\n", " "),
            "rows": rows, "engines": engines,
            "summary": {r["setting"]: {k: r[k] for k in ("needle_nll", "needle_top1",
                                                         "windows_all_top1", "needle_kept",
                                                         "other_nll")
                                       if k in r} for r in rows},
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        if a.out:  # after each setting: a timeout keeps the settings measured
            write_json(a.out, result)
    print(f"{'setting':<44} {'needle NLL':>10} {'top-1':>6} {'kept':>6} {'other NLL':>9}")
    for r in rows:
        kept, rest = r.get("needle_kept"), r.get("other_nll")
        print(f"{r['setting']:<44} {r['needle_nll']:>10.3f} {r['needle_top1']:>6.2f} "
              f"{'' if kept is None else f'{kept:.2f}':>6} "
              f"{'' if rest is None else f'{rest:.4f}':>9}")  # fmt: skip


if __name__ == "__main__":
    main()
