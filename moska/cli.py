"""The `moska` command: generate, serve, library management, benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from moska import __version__

_BENCHES = {
    "kernels": "moska.bench.kernels",
    "decode": "moska.bench.decode",
    "smoke": "moska.bench.smoke",
    "load": "moska.bench.load",
}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--attention", default="auto", help="auto, triton or torch")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--library-root", default=None, help="where libraries live")
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly instead of replaying CUDA graphs (CUDA only)",
    )
    p.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        default=None,
        help="wait for each step's tokens before scheduling the next (async is on on CUDA)",
    )


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        library_root=args.library_root,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
    )


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
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--library", default=None, help="name of a shared KV library to read")
    g.add_argument("--top-k-chunks", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_engine_args(g)

    s = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    s.add_argument("model", nargs="?", default=None, help="HF model directory (default: tiny)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("MOSKA_API_KEY"))
    s.add_argument("--library", action="append", default=[], help="library to load (repeat)")
    s.add_argument("--ttft-slo", type=float, default=5.0, help="reject when TTFT would exceed")
    s.add_argument("--max-queue", type=int, default=256, help="reject beyond this many waiting")
    s.add_argument("--no-demo-library", action="store_true", help="skip the demo library")
    _add_engine_args(s)

    lib = sub.add_parser("library", help="build, list, inspect and remove shared KV libraries")
    lsub = lib.add_subparsers(dest="library_command", metavar="ACTION")
    b = lsub.add_parser("build", help="prefill documents into a library")
    b.add_argument("files", nargs="+", help="text, Markdown or JSONL files, or directories")
    b.add_argument("--name", required=True)
    b.add_argument("--model", default=None)
    b.add_argument("--chunk-size", type=int, default=4096)
    b.add_argument("--mode", choices=["prefix", "independent"], default="prefix")
    b.add_argument("--jsonl-field", default="text")
    _add_engine_args(b)
    for name, help_ in (("ls", "list libraries"), ("info", "show one library"), ("rm", "delete")):
        c = lsub.add_parser(name, help=help_)
        if name != "ls":
            c.add_argument("name")
        c.add_argument("--model", default=None)
        c.add_argument("--library-root", default=None)

    bench = sub.add_parser("bench", help="run a benchmark (GPU benchmarks need CUDA)")
    bench.add_argument("which", choices=sorted(_BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "generate":
            from moska.cli_commands import run_generate

            return run_generate(args, _engine_kwargs(args))
        if args.command == "serve":
            from moska.server.serve import serve

            serve(
                model=args.model,
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                libraries=args.library,
                ttft_slo=args.ttft_slo,
                max_queue=args.max_queue,
                demo_library=not args.no_demo_library,
                engine_kwargs=_engine_kwargs(args),
            )
            return 0
        if args.command == "library":
            from moska.cli_commands import run_library

            if args.library_command is None:
                parser.parse_args(["library", "--help"])
            return run_library(args)
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
