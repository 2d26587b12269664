"""Decode tok/s of a running stream without and during a library build over HTTP.

Serves the built-in tiny model (CPU by default) on a free port, in a fresh MOSKA_HOME.
One streaming completion decodes (ignore_eos) throughout; the script counts its tokens over
a window with no build, then over the whole of a `POST /v1/libraries` build of about
--build-tokens tokens, and prints both rates, the longest gap between two tokens in each
window and the build's duration. A build that ran on the engine thread would show no tokens
(a gap as long as the build) in the second window. A small build runs first, unmeasured, so
that one-off costs (Triton compiling the prefill kernel on CUDA) stay out of the figures.

It measures each build mode in turn (`--modes process,thread`), each on a server of its
own over the same engine: `process` builds in a child process that shares the weights
(`ServerSettings.build_in_process=True`), `thread` on a thread of the server. A process
build's seconds include starting the child (importing torch and moska).

Usage: .venv/bin/python bench/build_during_decode.py [--build-tokens 4000] [--window 3]
       [--device cpu|cuda] [--modes process,thread]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

import httpx


def _stream(url: str, model: str, stamps: list[float], stop: threading.Event) -> None:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 3500,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if stop.is_set():
                    return  # closing the response aborts the request
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError:
        if not stop.is_set():  # after the measurement, the server may stop first
            raise


def _rate(stamps: list[float], t0: float, t1: float) -> tuple[float, float, float]:
    """(tokens/s, longest gap in s, its start in s after t0) of the tokens that arrived in
    [t0, t1]."""
    inside = [t for t in stamps if t0 <= t <= t1]
    edges = [t0, *inside, t1]
    gap, at = max((b - a, a - t0) for a, b in itertools.pairwise(edges))
    return len(inside) / (t1 - t0), gap, at


def _build(url: str, name: str, num_tokens: int) -> dict:
    """Build a library of about `num_tokens` tokens over HTTP and wait for it; the job,
    with `prefill_done` (perf_counter time its prefill was seen complete) added."""
    text = ("The quick brown fox jumps over the lazy dog. " * (num_tokens // 40 + 1))[:num_tokens]
    body = {"name": name, "documents": [{"name": "a.txt", "text": text}]}
    job = httpx.post(f"{url}/v1/libraries", json=body).json()
    prefill_done = None
    while job["status"] in ("queued", "running"):
        time.sleep(0.02)
        job = httpx.get(f"{url}/v1/libraries/jobs/{job['id']}").json()
        if prefill_done is None and job["prefilled_tokens"] == job["total_tokens"]:
            prefill_done = time.perf_counter()
    if job["status"] != "succeeded":
        sys.exit(f"the build did not succeed: {job}")
    return {**job, "prefill_done": prefill_done or time.perf_counter()}


def _measure(args: argparse.Namespace, engine: Any, mode: str) -> dict:
    """One mode on a server of its own (the engine is shared, one server at a time): the
    result row."""
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    settings = ServerSettings(
        build_prefill_tokens=args.prefill_tokens, build_in_process=mode == "process"
    )
    app = create_app(engine, settings)
    builds = app.state.moska.builds
    if builds.mode != mode:
        sys.exit(f"asked for {mode} builds, the server builds on a {builds.mode}")
    with background_server(app) as url:
        _build(url, f"bench-warmup-{mode}", 600)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        stamps: list[float] = []
        stop = threading.Event()
        streamer = threading.Thread(target=_stream, args=(url, model, stamps, stop), daemon=True)
        streamer.start()
        deadline = time.monotonic() + 60
        while len(stamps) < 20:  # past the prefill and the first steps
            if time.monotonic() > deadline or not streamer.is_alive():
                sys.exit("the stream did not start")
            time.sleep(0.01)
        t0 = time.perf_counter()
        time.sleep(args.window)
        base_rate, base_gap, _ = _rate(stamps, t0, time.perf_counter())

        b0 = time.perf_counter()
        try:
            job = _build(url, f"bench-build-{mode}", args.build_tokens)
        finally:
            stop.set()
        b1 = time.perf_counter()
        build_rate, build_gap, gap_at = _rate(stamps, b0, b1)
        streamer.join(30)
    return {
        "mode": mode,
        "build_tokens": job["total_tokens"],
        "build_seconds": round(b1 - b0, 3),
        "prefill_seconds": round(job["prefill_done"] - b0, 3),
        "prefill_tokens_per_piece": builds.prefill_tokens,
        "decode_tok_s_no_build": round(base_rate, 1),
        "decode_tok_s_during_build": round(build_rate, 1),
        "max_gap_s_no_build": round(base_gap, 4),
        "max_gap_s_during_build": round(build_gap, 4),
        "max_gap_starts_s_after_post": round(gap_at, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-tokens", type=int, default=4000)
    ap.add_argument("--window", type=float, default=3.0, help="seconds of the no-build window")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--prefill-tokens", type=int, default=None, help="tokens per prefill piece of a build"
    )
    ap.add_argument(
        "--modes", default="process,thread", help="build modes to measure, comma-separated"
    )
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"process", "thread"}:
        ap.error("--modes: a comma-separated list of process and thread")
    os.environ["MOSKA_HOME"] = tempfile.mkdtemp(prefix="moska-bench-home-")

    from moska.engine.llm_engine import LLMEngine

    # one engine for every mode: two would not fit on a GPU (each takes its share of memory)
    engine = LLMEngine.from_model(None, device=args.device, max_model_len=4096)
    rows = [_measure(args, engine, mode) for mode in modes]
    for r in rows:
        print(
            f"{r['mode']:>7}: decode {r['decode_tok_s_no_build']:.1f} tok/s without a build "
            f"(longest gap {r['max_gap_s_no_build'] * 1e3:.0f} ms), "
            f"{r['decode_tok_s_during_build']:.1f} tok/s during a {r['build_tokens']}-token "
            f"build of {r['build_seconds']:.2f} s (longest gap "
            f"{r['max_gap_s_during_build'] * 1e3:.0f} ms)"
        )
    from moska.bench.common import environment

    result = {**environment(), "device": args.device, "modes": rows}
    if args.device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    result["summary"] = {
        r["mode"]: round(r["decode_tok_s_during_build"] / max(r["decode_tok_s_no_build"], 1e-9), 3)
        for r in rows
    }  # decode tok/s during a build as a share of without
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
