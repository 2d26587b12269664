"""The `moska` command: generate, serve, library management, convert, benchmarks.

Engine flags are generated from `moska.config.EngineConfig`, one per field and named as
vLLM names them (`max_num_seqs` -> `--max-num-seqs`), so no engine setting is unreachable
from the command line; tests/test_cli_engine_args.py fails when a field has no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from moska import __version__
from moska.cli_convert import add_convert_parser, run_convert
from moska.cli_library import add_library_parser
from moska.config import EngineConfig
from moska.pd.cli import add_role_args, add_router_parser, pd_config

_BENCHES = {
    "kernels": "moska.bench.kernels",
    "decode": "moska.bench.decode",
    "smoke": "moska.bench.smoke",
    "load": "moska.bench.load",
    "fidelity": "moska.bench.fidelity",
    "trace": "moska.bench.trace",
    "serve": "moska.bench.serve",
}

# Help for each EngineConfig field's flag. A field missing here still gets a flag (with a
# generic help); the test asks for an entry so that a new field is documented.
ENGINE_FLAG_HELP: dict[str, str] = {
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (the checkpoint's), bfloat16, float16 or float32 (also half, float, bf16)",
    "attention": "auto (Triton on CUDA, PyTorch on CPU), triton or torch",
    "block_size": "tokens per KV block (a power of two)",
    "num_kv_blocks": "unique-KV blocks to allocate (default: sized from memory)",
    "gpu_memory_utilization": "share of the device's memory the engine may use (0.05-0.98): "
    "weights, activations, CUDA graphs, unique KV and the library cache, checked at startup",
    "memory_budget": "cap on the memory the engine accounts for, a size (2GiB, 512MiB); on "
    "CPU the RAM it plans against (default: the machine's RAM x gpu_memory_utilization)",
    "max_model_len": "context length in tokens (default: the model's)",
    "max_num_seqs": "requests in one step at most",
    "max_num_batched_tokens": "tokens in one step at most (the step's token budget)",
    "enable_chunked_prefill": "split long prompts across steps",
    "seed": "the engine's random seed (requests without a seed sample from it)",
    "library_root": "where libraries live (default: $MOSKA_HOME/libraries)",
    "default_top_k_chunks": "library chunks routed per step when a request names none",
    "enforce_eager": "run decode steps eagerly instead of replaying CUDA graphs (CUDA only)",
    "async_scheduling": "queue the next step before this step's tokens reach the host "
    "(default: on on CUDA, off on CPU)",
    "enable_prefix_caching": "reuse the KV blocks of prompt prefixes earlier requests computed",
    "tensor_parallel_size": "split the model over N ranks, one process each (rank 0 serves "
    "HTTP and schedules; on one host): moska starts them, or run this same command under "
    "`torchrun --nproc-per-node N -m moska`",
    "shared_kv_ranks": "hold every library's chunks on M processes without model weights "
    "(MoSKA shared-KV ranks; the engine routes and sends them query rows); 0: off. With "
    "--tensor-parallel-size N the N TP ranks do, each for its heads (N + M processes)",
    "shared_kv_replica_slots": "copies of a library's most read chunks each shared-KV rank "
    "may hold, re-planned every 16 forwards (EPLB-like, exact); 0: none",
    "decode_context_parallel_size": "shard each request's KV blocks over P ranks, one "
    "process each with the whole model (a request longer than one rank's KV cache is "
    "served; DistAttention); 1: off",
    "helix": "Helix layout: with --decode-context-parallel-size P (and --tensor-parallel-size "
    "N, a multiple of P; default N = P) the N ranks split the weights as tensor parallelism "
    "does, attention shards KV blocks over P ranks and heads over N/P, one all-to-all per "
    "layer returns to tensor parallelism for o_proj and the FFN",
    "helix_microbatches": "Helix HOP-B: cut each step's rows into this many micro-batches "
    "and overlap one's all-to-all with the next one's attention (1: off)",
    "library_gpu_budget": "GPU memory for each library's chunk cache: a size (8GiB, 512MiB; a "
    "plain number > 1 is GiB) or a share of free memory (<= 1); a larger library is served from GPU, pinned CPU and disk tiers "
    "(eagerly). Default: libraries wholly on the GPU",
    "library_cpu_budget": "pinned CPU memory for a tiered library's chunks, a size (default: "
    "all of it; 0: read each GPU miss from disk)",
    "library_eviction": "tiered libraries' chunk eviction: lfu (frequency with aging) or lru",
    "library_miss_policy": "a routed chunk not on the GPU: wait (exact) or skip (left out of "
    "that step, fetched for later ones; coverage shows in moska_routing)",
    "library_prefetch": "tiered libraries: next_layer (fetch layer l's chunks for layer l+1 "
    "while l runs) or none",
    "fp8_attention": "FP8 libraries on CUDA: upcast (default; exact on the e4m3 values), mma "
    "or mma_qsplit (FP8 tensor cores, about 1.4x faster at B=256 on an H200, top-1 vs bf16 "
    "0.987-0.990 for mma, 0.993 for mma_qsplit; V copied token-major: 1.5x the library's "
    "FP8 KV bytes); mma_qsplit_late: q split in the later half of the layers only (0.993 "
    "on the quality model)",
    "semantic_reuse": "SemShareKV: reuse the KV of a stored similar earlier prompt "
    "(approximate; see README)",
    "semantic_reuse_threshold": "token-match cosine for semantic reuse (token and context "
    "similarity; 1 = same token in the same context)",
    "semantic_recompute_fraction": "share of semantically matched tokens recomputed anyway "
    "(those whose KV deviates most; 0 by default: measured >= 3.1x prefill within 2%% loss)",
    "semantic_recompute_layers": "first layers computed for every prompt token under "
    "semantic reuse",
    "semantic_store_mb": "memory bound of the semantic reuse reference store (MiB, LRU; its "
    "KV is blocks of the KV cache, given back when an allocation needs them)",
    "flexicache": "FlexiCache for long unique contexts: 'on' (= k=32,recent=2,threshold=0.75,"
    "r=16,rerank=deferred,hold=on,slots=shared) or such items (stable KV heads read only their "
    "top-k pages and the recent ones; slots=layer: per-layer page pools; rerank=step reads a "
    "re-ranking's pages in its own step; approximate). Default: off",
    "routing_scorer": "library router scorer: keymax, two_stage, mean or bound (default: keymax)",
    "routing_dense_layers": "first layers that read every library chunk (default: 0)",
    "routing_always_first": "always read a library's first chunk (attention sinks; default: off)",
    "routing_always_last": "prefix libraries: always read the chunk nearest the request "
    "(default: off)",
    "routing_mass_threshold": "adaptive k: chunks until this estimated share of attention "
    "mass, at most top_k (0: a fixed k, the default; eager steps)",
    "routing_page_size": "score pages of this many tokens inside chunks (key-max), rank "
    "chunks by their pages (0: whole chunks, the default; eager steps)",
    "routing_per_kv_head": "each KV head picks its own chunks (default: on; off: one set per "
    "request, the KV heads' scores summed)",
}
_NOT_FLAGS = {"model"}  # positional / --model, per subcommand
_DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
                  "bf16": "bfloat16"}  # fmt: skip


def engine_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields that become flags (every field but the model)."""
    return [f for f in dataclasses.fields(EngineConfig) if f.name not in _NOT_FLAGS]


def _flag_type(hint: typing.Any) -> typing.Any:
    """bool, int, float or str for a field's type hint (`X | None` -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _dtype(value: str) -> str:
    return _DTYPE_ALIASES.get(value, value)


def _add_engine_args(p: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    group = p.add_argument_group("engine (moska.config.EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    for f in engine_fields():
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints[f.name])
        help_ = ENGINE_FLAG_HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(flag, action=action, default=f.default, help=help_)
            continue
        to_value = _dtype if f.name == "dtype" else kind
        shown = "" if f.default is None else " (default: %(default)s)"
        group.add_argument(flag, type=to_value, default=f.default, help=help_ + shown)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments (every field but the model) from parsed flags."""
    return {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}


def _ttft_slo(value: str) -> float | None:
    """--ttft-slo: seconds; 0, none or off turns SLO rejection off."""
    if value.strip().lower() in ("0", "0.0", "none", "off"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, 0 or none, got {value!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("must be positive seconds, or 0/none to turn it off")
    return seconds


def _byte_size(value: str) -> int:
    """--max-body-size: bytes, or a number with K, M or G (powers of 1024)."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 16M, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moska",
        description="moska: LLM inference for many requests that share long context.",
    )
    parser.add_argument("--version", action="version", version=f"moska {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", default=None, help="HF model directory (default: built-in tiny)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="the engine's and the request's seed")
    g.add_argument("--library", default=None, help="name of a shared KV library to read")
    g.add_argument(
        "--top-k-chunks",
        type=int,
        default=None,
        help="library chunks each layer reads (default: the engine's --default-top-k-chunks)",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--chat-template", default=None, help="a Jinja file or inline template")
    _add_engine_args(g, skip=frozenset({"seed"}))

    s = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    s.add_argument("model", nargs="?", default=None, help="HF model directory (default: tiny)")
    s.add_argument("--model", dest="model_flag", default=None, help="the same as MODEL")
    s.add_argument("--served-model-name", default=None, help="the id clients send as model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("MOSKA_API_KEY"))
    s.add_argument("--library", action="append", default=[], help="library to load (repeat)")
    s.add_argument(
        "--ttft-slo",
        type=_ttft_slo,
        default=5.0,
        help="reject a request whose predicted time to first token exceeds this many seconds "
        "(0 or none: never)",
    )
    s.add_argument("--max-queue", type=int, default=256, help="reject beyond this many waiting")
    s.add_argument(
        "--retry-bookings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a 429 books its request for the moment its Retry-After names: a retry of the "
        "same body then is admitted ahead of later arrivals, an early one is told the time "
        "left (default: on)",
    )
    s.add_argument(
        "--max-body-size",
        type=_byte_size,
        default=None,
        help="largest request body in bytes, or with K, M or G (default: 16M)",
    )
    s.add_argument(
        "--chat-template",
        default=None,
        help="chat template replacing the model's: a Jinja file path or the template itself",
    )
    s.add_argument(
        "--max-tokens-default",
        type=int,
        default=None,
        help="max_tokens of a request that gives none: what is left of the context after the "
        "library and the prompt, at most this (default: no cap)",
    )
    s.add_argument("--no-demo-library", action="store_true", help="skip the demo library")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_role_args(s)  # --role prefill|decode|both and the transfer group (moska/pd)
    _add_engine_args(s)

    add_library_parser(sub, _add_engine_args)
    add_convert_parser(sub)
    add_router_parser(sub)

    bench = sub.add_parser("bench", help="run a benchmark (GPU benchmarks need CUDA)")
    bench.add_argument("which", choices=sorted(_BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _serve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    if args.model and args.model_flag and args.model != args.model_flag:
        parser.error(f"two models given: {args.model!r} and --model {args.model_flag!r}")
    return args.model or args.model_flag


class _UvicornStyle(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname + ':':<10}{record.getMessage()}"


def _log_to_stderr(level: str) -> None:
    """moska's own log lines (startup report) in uvicorn's style: 'INFO:     message'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UvicornStyle())
    root = logging.getLogger("moska")
    root.addHandler(handler)
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "generate":
            from moska.cli_commands import run_generate

            kwargs = _engine_kwargs(args)
            if args.seed is not None:
                kwargs["seed"] = args.seed
            return run_generate(args, kwargs)
        if args.command == "serve":
            from moska.server.serve import serve

            _log_to_stderr(args.log_level)
            body = {} if args.max_body_size is None else {"max_body_bytes": args.max_body_size}
            serve(
                model=_serve_model(parser, args),
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                libraries=args.library,
                ttft_slo=args.ttft_slo,
                max_queue=args.max_queue,
                demo_library=not args.no_demo_library,
                engine_kwargs=_engine_kwargs(args),
                served_model_name=args.served_model_name,
                **body,
                chat_template=args.chat_template,
                max_tokens_default=args.max_tokens_default,
                log_level=args.log_level,
                pd=pd_config(args),
                retry_bookings=args.retry_bookings,
            )
            return 0
        if args.command == "router":
            from moska.pd.cli import run_router

            _log_to_stderr(args.log_level)
            return run_router(args)
        if args.command == "library":
            from moska.cli_commands import run_library

            if args.library_command is None:
                parser.parse_args(["library", "--help"])
            return run_library(args)
        if args.command == "convert":
            return run_convert(parser, args)
        if args.command == "bench":
            import runpy

            sys.argv = [_BENCHES[args.which], *args.rest]
            runpy.run_module(_BENCHES[args.which], run_name="__main__")
            return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"moska: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
