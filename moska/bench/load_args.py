"""`moska bench load`'s command line (its parser apart from the burst runner in load.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _slo(text: str) -> float | None:
    if text.lower() in ("0", "none", "off"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--ttft-slo must be >= 0 (0 or none: off)")
    return value or None


def _switch(p: argparse.ArgumentParser, flag: str, default: str, text: str) -> None:
    """An on/off flag (`auto` too when that is its default: the server's own setting)."""
    choices = ("auto", "on", "off") if default == "auto" else ("on", "off")
    p.add_argument(flag, choices=choices, default=default, help=text)


def switch(value: str) -> bool | None:
    """An `_switch` flag's value: True, False, or None for `auto`."""
    return None if value == "auto" else value == "on"


def build_parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moska bench load",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="HF model directory (default: tiny)")
    p.add_argument("--burst", default="64,300,1000", help="clients sent at once, per burst")
    p.add_argument("--ttft-slo", type=_slo, default=5.0, help="seconds; 0 or none: off")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--library", default="demo", help="library name ('demo' is built); none")
    p.add_argument("--library-share", type=float, default=0.5)
    p.add_argument("--warmup", default="2,8,24", help="small waves before the bursts")
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument(
        "--library-risk",
        type=float,
        default=1.5,
        help="a library request with others queued must fit with this factor on its TTFT",
    )
    _switch(
        p,
        "--door-lag",
        "on",
        "a door 429's drain counts the event loop's lag (an A/B of that term)",
    )
    _switch(
        p,
        "--door-storm",
        "off",
        "a door 429's drain counts the connections not answered yet (door_backlog; "
        "off since session 16: a retry sent in the storm waits it out in the server)",
    )
    p.add_argument(
        "--engine-share",
        type=float,
        default=None,
        help="the door's engine share while the loop decides a burst (burst_admits; A/B)",
    )
    p.add_argument(
        "--door-rate",
        choices=("sums", "mean"),
        default=None,
        help="the door's time per answer under a storm (door_backlog; mean: before, A/B)",
    )
    _switch(
        p,
        "--promise-learning",
        "off",
        "429 drains scaled by how recent ones came out (admission_promises; A/B)",
    )
    p.add_argument(
        "--door-wait",
        choices=("open", "empty"),
        default="empty",
        help="a drain waits until the door is empty, or lets a retry in (session 17; A/B)",
    )
    _switch(
        p,
        "--bookings",
        "on",
        "a 429 books its request's retry (server/bookings.py; the default; A/B)",
    )
    p.add_argument(
        "--door-anchor",
        choices=("off", "plain", "door", "all"),
        default="door",
        help="a drain's step in progress ends with the door's storm (storm_anchor; A/B)",
    )
    _switch(
        p,
        "--storm-bound",
        "auto",
        "a new request's overrun scale lasts only the event loop's backlog "
        "(storm_anchor.storm_bounded_s; auto: the server's default, on for a GPU engine)",
    )
    p.add_argument(
        "--booked-headroom",
        type=float,
        default=None,
        help="a booked retry at its moment is admitted within this share of the SLO "
        "(admission_bookings.booked_fits_s; default: the server's)",
    )
    _switch(
        p,
        "--booked-by-send",
        "off",
        "a retry is early or on time by when it was sent (admission_bookings; A/B)",
    )
    p.add_argument(
        "--rebook-within",
        type=float,
        default=None,
        help="a refused booked retry is booked again within this many times its first "
        "promise (bookings.py; A/B, default: behind the whole queue)",
    )
    _switch(
        p,
        "--space-by-booked",
        "auto",
        "space booked moments by the booked retries' own slowdown factor (auto: the "
        "server's default, on for a CPU engine)",
    )
    _switch(
        p,
        "--gc-freeze",
        "on",
        "freeze the objects alive at startup out of the collector's reach (server/app.py)",
    )
    p.add_argument(
        "--door-early", choices=("on", "all", "off"), default="off", help="door_early.py"
    )
    p.add_argument(
        "--obey-retries",
        type=int,
        default=0,
        metavar="N",
        help="clients retry each 429 for real after its retry-after-ms, up to N times, like "
        "the OpenAI SDK (max_retries=2); a sampled 429 is retried dry only at half its "
        "promise (load_obey). 0: no client retries (before session 19)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--probe-interval", type=float, default=0.25)
    p.add_argument("--in-process-client", action="store_true")
    p.add_argument("--trace", action="store_true", help="TTFT parts of admitted (load_trace)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    return p
