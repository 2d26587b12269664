"""`moska convert KIND ...`: the flags (imports nothing heavy) and the dispatch to the
conversions in `moska/model/convert*.py`."""

from __future__ import annotations

import argparse
from typing import Any


def add_convert_parser(sub: Any) -> None:
    """Add `convert` and its kinds to the top-level subparsers `sub`."""
    conv = sub.add_parser("convert", help="make a smaller-KV variant of a checkpoint")
    csub = conv.add_subparsers(dest="convert_command", metavar="KIND")
    m = csub.add_parser(
        "mlkv",
        help="layers share KV in groups of N (MLKV); no training: measure its quality",
        description="Group consecutive layers by --share; each group keeps one KV "
        "projection (in its first layer) that every layer of the group attends to. "
        "Without uptraining the variant loses quality: measure it (bench/mlkv_quality.py).",
    )
    m.add_argument("model", help="Hugging Face model folder (safetensors)")
    m.add_argument("--share", type=int, required=True, help="layers per KV group (>= 2)")
    m.add_argument(
        "--merge",
        choices=("mean", "first"),
        default="mean",
        help="the group's KV projection: the mean of the group's, or its first layer's",
    )
    m.add_argument("--out", required=True, help="output folder (new or empty)")


def run_convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the conversion `args` names; bad input ends in parser.error (exit status 2)."""
    from moska.model.convert import ConvertError

    try:
        if args.convert_command == "mlkv":
            from moska.model.convert_mlkv import convert_mlkv

            report = convert_mlkv(args.model, args.out, share=args.share, merge=args.merge)
        else:
            parser.parse_args(["convert", "--help"])
            return 2
    except ConvertError as e:
        parser.error(str(e))
    print(report.describe())
    return 0
