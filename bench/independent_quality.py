"""What position-independent libraries cost in quality, and which known fix pays it back.

Held-out files (the networkx and sympy sources in this venv; neither package was trained on)
are scored with a library made of their package's *other* files (their directory's siblings,
the modules a target imports first). Each target is the file's first ``--target-tokens``
tokens; its loss is the mean next-token loss (nats) of those tokens, the first excepted (the
same token set in every setting). Settings:

- ``none``: ``<eot> F`` alone.
- ``prefix``: ``<eot> A1 \\n A2 ...  F`` as one context (fits the model's context), all chunks
  and top-k.
- ``independent``: each chunk of ``--chunk-size`` tokens prefilled alone at positions
  0..len-1 (what ``moska library build --mode independent`` stores); the request's own tokens
  start at position ``chunk_size``. All chunks, top 25 % and top 12.5 %.
- fixes of independent mode: ``request_bos`` (the request starts with ``<eot>``: one attention
  sink; today's engine sends none after a library); ``chunk_sink`` (each chunk prefilled
  after an ``<eot>`` whose row is then dropped, so its tokens see the sink they were trained
  with, plus the request's ``<eot>``); APE's shared-part temperature ``T`` (logits of the
  library keys times 1/T) and scale ``S`` (the library part's LSE + log S in the merge).
- ``past context``: a library of ``--long-tokens`` (several times the model's context), only
  possible in independent mode.

Everything runs through moska's own code: ``build_in_memory`` prefills the libraries (the
builder the server uses), ``route`` (key-max, PyTorch reference) picks the chunks, and the
forward is ``CausalLM`` with an attention that does what ``attention/backend.py`` does:
the request's causal attention over its own tokens, attention over the routed chunks, and
an LSE merge (here as one masked dense product per layer, the same math as the grouped
kernel + merge, vectorized for CPU). fp32, CPU. Fix parameters are chosen on the even
targets (dev) and reported on all and on the odd ones (test).

Usage: .venv/bin/python bench/independent_quality.py [--targets 4] [--out FILE]
       (--cpu-dry-run: 1 target per package, short texts; checks the pipeline in ~1 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moska.kernels.router import route
from moska.library.builder import build_in_memory
from moska.library.positions import IndependentOptions
from moska.model import load_model

PACKAGES = ("networkx", "sympy")
MAX_FILE_BYTES = 200_000  # the training corpus's filter


@dataclass(frozen=True)
class Shared:
    """The library part of one evaluation: pools, chunk offsets, routing, APE knobs."""

    library: object  # LoadedLibrary
    top_k: int
    temperature: float = 1.0
    lse_bias: float = 0.0  # log S


class LibraryAttention:
    """``attn(layer, q, k, v)`` for one sequence of request tokens reading a library:
    causal attention over its own tokens, attention over each row's routed chunks, merged by
    LSE (``attention/backend.py``'s math in fp32)."""

    def __init__(self, shared: Shared | None, sm_scale: float) -> None:
        self.shared, self.sm_scale = shared, sm_scale
        self.coverage: list[float] = []

    def __call__(self, layer, q, k, v):
        T, Hq, _D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        qf = q.float()
        kf = k.float().repeat_interleave(G, dim=1)
        vf = v.float().repeat_interleave(G, dim=1)
        s = torch.einsum("thd,shd->hts", qf, kf) * self.sm_scale  # [Hq, T, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, -math.inf)
        if self.shared is not None:
            sh = self.shared
            lib = sh.library
            kp = lib.k_pools[layer].float().repeat_interleave(G, dim=1)  # [S, Hq, D]
            vp = lib.v_pools[layer].float().repeat_interleave(G, dim=1)
            ss = torch.einsum("thd,shd->hts", qf, kp) * (self.sm_scale / sh.temperature)
            if sh.top_k < lib.num_chunks:
                sel = route(q, lib.routing[layer], sh.top_k, use_triton=False)
                allowed = torch.zeros(T, Hkv, lib.num_chunks, dtype=torch.bool)
                allowed[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
                offs = lib.chunk_offsets.long()
                row_chunk = torch.bucketize(torch.arange(kp.shape[0]), offs[1:], right=True)
                mask = allowed[:, :, row_chunk]  # [T, Hkv, S]
                mask = mask.repeat_interleave(G, dim=1).permute(1, 0, 2)  # [Hq, T, S]
                ss = ss.masked_fill(~mask, -math.inf)
            ss = ss + sh.lse_bias  # exp(lse + log S) = S * sum exp(logits)
            s = torch.cat([ss, s], dim=2)
            vf = torch.cat([vp, vf], dim=0)
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hts,shd->thd", p, vf)
        return o.to(q.dtype)


@torch.inference_mode()
def target_loss(lm, ids: list[int], start_pos: int, n_score: int, shared: Shared | None):
    """Summed loss of the last ``n_score`` next-token predictions of ``ids`` (request tokens
    at positions start_pos..), and their count."""
    model = lm.model
    x = torch.tensor(ids)
    pos = torch.arange(start_pos, start_pos + len(ids))
    hidden = model(x, pos, LibraryAttention(shared, lm.config.sm_scale))
    logits = model.compute_logits(hidden[-n_score - 1 : -1])
    return float(F.cross_entropy(logits, x[-n_score:], reduction="sum")), n_score


def package_files(pkg: str) -> list[Path]:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{pkg} is not installed in this venv: it is the held-out text")
    base = Path(next(iter(spec.submodule_search_locations)))
    return sorted(
        p
        for p in base.rglob("*.py")
        if p.stat().st_size <= MAX_FILE_BYTES and "tests" not in p.parts
    )


def read_ids(tok, path: Path) -> list[int]:
    try:
        return tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    except UnicodeDecodeError:
        return []


def pick_targets(tok, files: list[Path], n: int, min_tokens: int, seed: int) -> list[Path]:
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    pool = [f for f in files if len(by_dir[f.parent]) >= 8 and f.name != "__init__.py"]
    random.Random(seed).shuffle(pool)
    out, dirs = [], set()
    for f in pool:
        if f.parent in dirs:
            continue  # one target per directory: libraries differ
        if len(read_ids(tok, f)) >= min_tokens:
            out.append(f)
            dirs.add(f.parent)
        if len(out) == n:
            break
    return out


def library_docs(tok, target: Path, files: list[Path], budget: int, per_doc: int):
    """The package's other files, nearest first: the target's directory (modules it names
    first), then the rest of the package; each cut to ``per_doc`` tokens, ``budget`` total."""
    text = target.read_text(encoding="utf-8")
    others = [f for f in files if f != target]
    named = set(re.findall(r"\b(\w+)\b", text))

    def rank(f: Path) -> tuple:
        return (f.parent != target.parent, f.stem not in named, str(f))

    docs, total = [], 0
    for f in sorted(others, key=rank):
        ids = read_ids(tok, f)[:per_doc]
        if len(ids) < 32:
            continue
        ids = ids[: budget - total]
        docs.append((str(f.name), ids))
        total += len(ids)
        if total >= budget:
            break
    return docs


def build(lm, docs, mode: str, chunk_size: int, sink: bool = False):
    """A library in memory through moska's builder. prefix: ``<eot> d1 \\n d2 \\n ...``;
    independent: each chunk alone; ``sink``: each chunk prefilled after an ``<eot>`` whose row
    is dropped afterwards (what ``chunk_sink`` stores)."""
    bos = lm.tokenizer.bos_token_id
    nl = lm.tokenizer.encode("\n", add_special_tokens=False)
    if mode == "prefix":
        ids = [bos]
        for i, (_, d) in enumerate(docs):
            ids += d + (nl if i + 1 < len(docs) else [])
        lib, _ = build_in_memory(lm, [("all", ids)], "q", chunk_size=chunk_size, mode="prefix",
                                 progress=False)  # fmt: skip
        return lib
    opts = IndependentOptions(chunk_sink=sink)  # APE knobs applied by LibraryAttention
    lib, _ = build_in_memory(lm, docs, "q", chunk_size=chunk_size, mode="independent",
                             progress=False, independent=opts)  # fmt: skip
    return lib


def ceil_frac(c: int, frac: float) -> int:
    return max(1, math.ceil(c * frac))


def run_target(lm, tok, target: Path, files, args, grid) -> dict:
    bos = tok.bos_token_id
    f_ids = read_ids(tok, target)[: args.target_tokens]
    n = len(f_ids) - 1  # scored: f[1:]
    cs = args.chunk_size
    rows: dict[str, float] = {}

    def score(name, ids, start, shared):
        s, cnt = target_loss(lm, ids, start, n, shared)
        rows[name] = round(s / cnt, 4)

    score("none", [bos] + f_ids, 0, None)
    fit_docs = library_docs(tok, target, files, args.fit_tokens, args.per_doc)
    long_docs = library_docs(tok, target, files, args.long_tokens, args.per_doc)
    pre = build(lm, fit_docs, "prefix", cs)
    C = pre.num_chunks
    score("prefix/all", f_ids, pre.num_tokens, Shared(pre, C))
    score("prefix/top25%", f_ids, pre.num_tokens, Shared(pre, ceil_frac(C, 0.25)))
    info = {"target": "/".join(target.parts[-3:])}
    for tag, docs in (("fit", fit_docs), ("long", long_docs)):
        ind = build(lm, docs, "independent", cs)
        snk = build(lm, docs, "independent", cs, sink=True)
        C = ind.num_chunks
        info[f"{tag}_library_tokens"] = ind.num_tokens
        info[f"{tag}_chunks"] = C
        for frac, label in ((1.0, "all"), (0.25, "top25%"), (0.125, "top12.5%")):
            k = C if frac == 1.0 else ceil_frac(C, frac)
            score(f"{tag}/independent/{label}", f_ids, cs, Shared(ind, k))
            score(f"{tag}/independent+request_bos/{label}", [bos] + f_ids, cs, Shared(ind, k))
            score(f"{tag}/independent+chunk_sink/{label}", [bos] + f_ids, cs + 1, Shared(snk, k))
            for t, b in grid:
                score(f"{tag}/independent+chunk_sink+ape(T={t},logS={b})/{label}",
                      [bos] + f_ids, cs + 1, Shared(snk, k, t, b))  # fmt: skip
    info["target_tokens"] = len(f_ids)
    info["losses"] = rows
    return info


def mean_over(results: list[dict], key: str) -> float:
    return round(sum(r["losses"][key] for r in results) / len(results), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/moska-code-20m"))
    ap.add_argument("--targets", type=int, default=2, help="held-out targets per package")
    ap.add_argument("--target-tokens", type=int, default=192)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--fit-tokens", type=int, default=1024, help="library that fits (prefix)")
    ap.add_argument("--long-tokens", type=int, default=4608, help="library past the context")
    ap.add_argument("--per-doc", type=int, default=512, help="tokens kept per library file")
    ap.add_argument(
        "--ape",
        nargs="+",
        default=["0.9,-0.5", "1.0,-0.5"],
        help="APE (temperature,log scale) pairs tried on chunk_sink libraries",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--resummarize", metavar="FILE", help="recompute FILE's summary, run nothing")
    ap.add_argument("--out", default=str(ROOT / "bench/results/independent_quality.json"))
    args = ap.parse_args()
    if args.resummarize:
        resummarize(args.resummarize)
        return
    if args.cpu_dry_run:
        args.targets, args.target_tokens, args.fit_tokens, args.long_tokens = 1, 96, 384, 768
        args.chunk_size, args.per_doc = 128, 256
        args.ape = ["0.9,-0.5"]
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    tok = lm.tokenizer
    ctx = lm.config.max_position_embeddings
    assert args.fit_tokens + args.target_tokens + 1 <= ctx, "the prefix library must fit"
    grid = [tuple(float(x) for x in pair.split(",")) for pair in args.ape]
    results = []
    for pkg in PACKAGES:
        files = package_files(pkg)
        for target in pick_targets(tok, files, args.targets, args.target_tokens + 1, args.seed):
            r = run_target(lm, tok, target, files, args, grid)
            r["package"] = pkg
            results.append(r)
            print(f"{r['target']}: " + ", ".join(
                f"{k}={v}" for k, v in r["losses"].items() if "ape" not in k), file=sys.stderr,
                flush=True)  # fmt: skip
    keys = list(results[0]["losses"])
    dev, test = results[0::2], results[1::2] or results
    table = {k: {"all": mean_over(results, k), "dev": mean_over(dev, k),
                 "test": mean_over(test, k)} for k in keys}  # fmt: skip
    summary = summarize(table, grid)
    print(f"{'setting':<64} {'all':>7} {'dev':>7} {'test':>7}")
    for k, v in table.items():
        print(f"{k:<64} {v['all']:>7.4f} {v['dev']:>7.4f} {v['test']:>7.4f}")
    print(json.dumps(summary, indent=1))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {
        "what": "loss (nats) of held-out files' tokens with a library of their package's other "
        "files: no library / prefix / position-independent, and independent mode's fixes",
        "model": Path(args.model).name,
        "model_context": ctx,
        "device": "cpu",
        "dtype": "float32",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git_commit": commit,
        "command": "python " + " ".join(sys.argv),
        "shapes": {
            k: getattr(args, k)
            for k in (
                "targets",
                "target_tokens",
                "chunk_size",
                "fit_tokens",
                "long_tokens",
                "per_doc",
            )
        },
        "summary": summary,
        "mean_loss": table,
        "per_target": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def summarize(table: dict, grid) -> dict:
    def m(k, split="all"):
        return table[k][split]

    out = {"none": m("none"), "prefix_all": m("prefix/all"), "prefix_top25": m("prefix/top25%")}
    for tag in ("fit", "long"):
        for label in ("all", "top25%", "top12.5%"):
            out[f"{tag}_independent_{label}"] = m(f"{tag}/independent/{label}")
            out[f"{tag}_independent_request_bos_{label}"] = m(
                f"{tag}/independent+request_bos/{label}"
            )
            out[f"{tag}_independent_chunk_sink_{label}"] = m(
                f"{tag}/independent+chunk_sink/{label}"
            )
    # APE knobs: chosen on dev (mean over fit+long, all settings), reported on test
    best, best_dev = None, None
    for t, b in [(1.0, 0.0)] + list(grid):

        def key(tag, label, t=t, b=b):
            if (t, b) == (1.0, 0.0):
                return f"{tag}/independent+chunk_sink/{label}"
            return f"{tag}/independent+chunk_sink+ape(T={t},logS={b})/{label}"

        keys = [key(tag, lab) for tag in ("fit", "long") for lab in ("all", "top25%", "top12.5%")]
        dev = sum(m(k, "dev") for k in keys) / len(keys)
        test = sum(m(k, "test") for k in keys) / len(keys)
        out[f"ape_T={t}_logS={b}_dev_mean"] = round(dev, 4)
        out[f"ape_T={t}_logS={b}_test_mean"] = round(test, 4)
        if best_dev is None or dev < best_dev:
            best, best_dev = (t, b), dev
    out["ape_best_on_dev"] = {"temperature": best[0], "log_scale": best[1]}
    # The defaults (positions.DEFAULT_INDEPENDENT): a fix is on when it lowers the test mean
    # over the independent settings (fit and long; all, 25 %, 12.5 % of the chunks).
    settings = [(t, lab) for t in ("fit", "long") for lab in ("all", "top25%", "top12.5%")]

    def test_mean(variant):
        return sum(m(f"{t}/{variant}/{lab}", "test") for t, lab in settings) / len(settings)

    plain, sink = test_mean("independent"), test_mean("independent+chunk_sink")
    ape_test = out[f"ape_T={best[0]}_logS={best[1]}_test_mean"]
    out["independent_test_mean"] = round(plain, 4)
    out["chunk_sink_test_mean"] = round(sink, 4)
    out["defaults"] = {
        "chunk_sink": sink < plain,
        "temperature": best[0] if ape_test < round(sink, 4) else 1.0,
        "log_scale": best[1] if ape_test < round(sink, 4) else 0.0,
        "why": f"chunk_sink test mean {sink:.4f} vs {plain:.4f} without; APE chosen on dev "
        f"(T={best[0]}, log S={best[1]}) test mean {ape_test:.4f} vs {sink:.4f} without",
    }
    return out


def resummarize(path: str) -> None:
    """Recompute the ``summary`` of a result file from its ``mean_loss`` table (the same
    function a run applies), e.g. after the summary's rules changed."""
    result = json.loads(Path(path).read_text())
    table = result["mean_loss"]
    grid = sorted(
        {
            tuple(float(x.split("=")[1]) for x in k.split("ape(")[1].split(")")[0].split(","))
            for k in table
            if "ape(" in k
        }
    )
    result["summary"] = summarize(table, grid)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
