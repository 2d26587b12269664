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

    k = csub.add_parser(
        "kv-heads",
        help="fewer KV heads (MHA -> GQA -> MQA) by projections fitted on calibration text",
        description="Merge groups of KV heads into one each: low-rank projections of V and "
        "of pre-RoPE K (per RoPE pair) fitted on calibration text and folded into q/k/v/o, "
        "or (--method mean) mean-pooling. The output is a plain GQA checkpoint.",
    )
    k.add_argument("model", help="Hugging Face model folder (safetensors)")
    k.add_argument("--kv-heads", type=int, required=True, help="KV heads to keep")
    k.add_argument("--calibration", nargs="+", default=[], help="text files to fit on")
    k.add_argument("--method", choices=("fit", "mean"), default="fit")
    k.add_argument("--calibration-tokens", type=int, default=32768, help="tokens used at most")
    k.add_argument("--calibration-length", type=int, default=2048, help="tokens per sequence")
    k.add_argument("--out", required=True, help="output folder (new or empty)")


def run_convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the conversion `args` names; bad input ends in parser.error (exit status 2)."""
    from moska.model.convert import ConvertError

    try:
        report: Any
        if args.convert_command == "mlkv":
            from moska.model.convert_mlkv import convert_mlkv

            report = convert_mlkv(args.model, args.out, share=args.share, merge=args.merge)
        elif args.convert_command == "kv-heads":
            from moska.model.convert_kv_heads import calibration_sequences, convert_kv_heads

            calib = []
            if args.method == "fit":
                calib = calibration_sequences(
                    args.model, args.calibration, args.calibration_length, args.calibration_tokens
                )
            report = convert_kv_heads(
                args.model, args.out, kv_heads=args.kv_heads, calibration=calib, method=args.method
            )
        else:
            parser.parse_args(["convert", "--help"])
            return 2
    except ConvertError as e:
        parser.error(str(e))
    print(report.describe())
    return 0
