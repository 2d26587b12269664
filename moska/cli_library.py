"""`moska library`'s command line: build (with the position-independent options), ls, info, rm.

Kept apart from `moska/cli.py` (the top-level parser) so each stays one concept; the engine
flags come from the caller (`cli._add_engine_args`), which owns their generation.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_library_parser(
    sub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add `library build|ls|info|rm` to the top-level subparsers `sub`."""
    lib = sub.add_parser("library", help="build, list, inspect and remove shared KV libraries")
    lsub = lib.add_subparsers(dest="library_command", metavar="ACTION")
    b = lsub.add_parser("build", help="prefill documents into a library")
    b.add_argument("files", nargs="+", help="text, Markdown or JSONL files, or directories")
    b.add_argument("--name", required=True)
    b.add_argument("--model", default=None)
    b.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="tokens per chunk, the unit the router picks (default: a power of two giving "
        "about 32 chunks, 64 to 4096)",
    )
    b.add_argument(
        "--mode",
        choices=["prefix", "independent"],
        default="prefix",
        help="prefix: one causal context, requests read it as a prefix (exact with all "
        "chunks); independent: each chunk prefilled alone (chunks reusable in any order)",
    )
    b.add_argument(
        "--routing-rank",
        type=int,
        default=None,
        help="rank of the key-max routing index (default: head_dim / 4; see docs/routing.md)",
    )
    b.add_argument(
        "--kv-dtype",
        choices=["auto", "fp8", "fp8_rotated"],
        default="auto",
        help="library KV dtype: auto = the model's; fp8 = e4m3 with per-(token, KV head) "
        "scales (half the bytes); fp8_rotated = e4m3 with K Hadamard-rotated and K and V "
        "scales per 128-row block, q rotated alike when read (with --fp8-attention mma: "
        "1.43x bf16 attention at B = 1,024 on an H200, top-1 0.99 on the quality model; "
        "needs a power-of-two head dim)",
    )
    b.add_argument("--jsonl-field", default="text")
    add_engine_args(b)
    _add_independent_args(b)
    for name, help_ in (("ls", "list libraries"), ("info", "show one library"), ("rm", "delete")):
        c = lsub.add_parser(name, help=help_)
        if name != "ls":
            c.add_argument("name")
        c.add_argument("--model", default=None)
        c.add_argument("--library-root", default=None)


def _add_independent_args(b: argparse.ArgumentParser) -> None:
    """`library build`'s options of a position-independent library (library/positions.py
    IndependentOptions; defaults measured: bench/results/independent_quality.json)."""
    b.add_argument(
        "--chunk-sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="independent mode: prefill each chunk after the model's BOS (not stored; a "
        "request brings one). Default: on",
    )
    for flag, what in (("temperature", "logits times 1/T"), ("log-scale", "LSE plus log S")):
        b.add_argument(
            f"--attention-{flag}",
            type=float,
            default=None,
            help=f"independent mode: the library part's attention {what} (APE)",
        )
    for flag, what in (("tokens", "the first M tokens of"), ("layers", "in the first L layers")):
        b.add_argument(
            f"--repair-{flag}",
            type=int,
            default=None,
            help=f"independent mode, boundary repair (with the other --repair-*): recompute "
            f"{what} every chunk that continues a document after the chunk before it",
        )
