"""Load test of admission control: bursts of streaming clients at once, with and without a
shared library, against the real HTTP server on loopback.

    moska bench load --burst 64,300,1000 --ttft-slo 5 --library demo \\
        --out bench/results/load_bursts_cpu_library.json

Starts the server (the tiny default model unless --model) with a TTFT SLO, warms the
admission's step-time model up with a few small waves, unloads the library (so the first
burst also pays its load), then sends each burst at once from a separate client process.
After a burst's first 429 a prober re-sends a typical request every --probe-interval
seconds until one is admitted: that time, minus when each 429 arrived, is the observed
drain its Retry-After is compared with. Reports per burst: admitted, rejected, the share
of admitted requests whose first token came within the SLO, TTFT p50/p99, Retry-After vs
observed drain (and OpenAI's `retry-after-ms`, exact), and the predictor's error
(observed minus predicted server-side TTFT of each admitted request), and for library
429s their predicted TTFT and how many only the library risk factor (--library-risk)
turned away. Checks that nothing accepted was lost, failed or hung.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moska.bench.load_client import burst_in_process
from moska.bench.load_drain import compare_429s, library_by_probe, probe_bodies, within_2x


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def make_body(
    rng: random.Random, model: str, max_tokens: int, library: str | None, seed: int
) -> dict:
    body = {
        "model": model,
        "prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(8, 256))),
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if library is not None:
        body["library"] = library
    return body


_PROBE_KEYS = ("probes", "status", "t_start", "t_status", "ttft", "error", "prompt_chars")


def summarize(
    n: int,
    out: dict,
    outcomes: list[tuple[float, float]],
    slo: float | None,
    wall_s: float,
    fits_s: float | None = None,
) -> dict:
    """One burst's figures from the client records and the server's (predicted, observed)
    TTFT pairs of the requests it admitted. `fits_s`: the predicted TTFT admission accepts
    (headroom x SLO), to tell which library 429s only the library risk factor caused."""
    recs = out["requests"]
    admitted = [r for r in recs if r["status"] == 200]
    rejected = [r for r in recs if r["status"] == 429]
    ttft = [r["ttft"] for r in admitted if r["ttft"] is not None]
    met = sum(1 for t in ttft if slo is None or t <= slo)
    # the same, counting the client's own connect and write (its CPU is the server's too)
    full = [r["ttft"] + (r.get("connect_s") or 0.0) for r in admitted if r["ttft"] is not None]
    connect = [r["connect_s"] for r in recs if r.get("connect_s") is not None]
    # admission reopened when the first probe that was admitted was sent
    t_open = {
        kind: p["t_start"] if p.get("t_start") is not None else p["t_status"]
        for kind, p in out["probes"].items()
        if p.get("status") == 200
    }
    # header / observed drain (the nearest probe of its kind, load_drain): Retry-After
    # (whole seconds), retry-after-ms; per kind
    rows = compare_429s(rejected, out["probes"], t_open)
    drains = [c["observed_s"] for c in rows]
    ratios = [c["retry_after_s"] / c["observed_s"] for c in rows]
    ms_kind: dict[str, list[float]] = {"plain": [], "library": []}
    for c in rows:
        if c["promised_s"] is not None:
            ms_kind[c["kind"]].append(c["promised_s"] / c["observed_s"])
    ms = ms_kind["plain"] + ms_kind["library"]
    # as before there was a short library probe: every library 429 against the long one
    long = [
        c["promised_s"] / max(t_open["library"] - c["t_status"], 1e-3)
        for c in rows
        if c["kind"] == "library" and c["promised_s"] is not None and "library" in t_open
    ]
    errors = [obs - pred for pred, obs in outcomes]
    # library 429s that admission decided (the body read): their predicted TTFT, and how
    # many would have fit without the library risk factor
    lib_decided = [
        r["predicted_ttft_s"]
        for r in rejected
        if r["library"] and r.get("at_door") is False and r.get("predicted_ttft_s") is not None
    ]
    lib = [r for r in admitted if r["library"]]
    return {
        "clients": n,
        "admitted": len(admitted),
        "rejected_429": len(rejected),
        "failed": sum(1 for r in recs if r["error"] is not None),
        "hung": sum(1 for r in recs if r["hung"]),
        "completed": sum(1 for r in admitted if r["completed"]),
        "library_admitted": len(lib),
        "library_rejected": sum(1 for r in rejected if r["library"]),
        "slo_met_share": met / len(admitted) if admitted else None,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "ttft_max_s": max(ttft) if ttft else None,
        "slo_met_share_with_connect": (
            sum(1 for t in full if slo is None or t <= slo) / len(admitted) if admitted else None
        ),
        "ttft_with_connect_p50_p99_s": [_pct(full, 0.5), _pct(full, 0.99)],
        "client_connect_s_p50_p99": [_pct(connect, 0.5), _pct(connect, 0.99)],
        "library_429_at_door": sum(1 for r in rejected if r["library"] and r.get("at_door")),
        "library_429_predicted_ttft_s_p10_p50_p90": [_pct(lib_decided, q) for q in (0.1, 0.5, 0.9)]
        if lib_decided
        else None,
        "library_429_only_for_risk": sum(1 for t in lib_decided if t <= fits_s)
        if fits_s is not None
        else None,
        "library_ttft_p50_s": _pct([r["ttft"] for r in lib if r["ttft"] is not None], 0.5),
        "rejection_s_p99": _pct([r["t_status"] for r in rejected], 0.99),
        "retry_after_s_median": _pct([int(r["retry_after"]) for r in rejected], 0.5)
        if rejected
        else None,
        "observed_drain_s_median": _pct(drains, 0.5),
        "retry_after_within_2x_share": within_2x(ratios),
        "retry_after_over_drain_p10_p50_p90": [_pct(ratios, q) for q in (0.1, 0.5, 0.9)]
        if ratios
        else None,
        # Retry-After is whole seconds (at least 1, per HTTP): retry-after-ms (OpenAI's
        # header, which its clients prefer) says the predicted drain exactly
        "retry_after_ms_median": _pct([int(r["retry_after_ms"]) for r in rejected], 0.5)
        if rejected and all((r.get("retry_after_ms") or "").isdigit() for r in rejected)
        else None,
        "retry_after_ms_within_2x_share": within_2x(ms),
        "retry_after_ms_over_drain_p10_p50_p90": [_pct(ms, q) for q in (0.1, 0.5, 0.9)]
        if ms
        else None,
        "retry_after_ms_within_2x_share_plain_library": [
            within_2x(ms_kind["plain"]),
            within_2x(ms_kind["library"]),
        ],
        "retry_after_ms_within_2x_share_library_vs_long_probe": within_2x(long),
        "retry_after_ms_library_by_probe": library_by_probe(rows),
        "rejections": rows,
        "probes": {kind: {k: p.get(k) for k in _PROBE_KEYS} for kind, p in out["probes"].items()},
        "predictor_error_s_p10_p50_p90_p99": [_pct(errors, q) for q in (0.1, 0.5, 0.9, 0.99)],
        "predictor_abs_rel_error_p50_p90": [
            _pct([abs(o - p) / o for p, o in outcomes if o > 0], q) for q in (0.5, 0.9)
        ],
        "wall_s": wall_s,
    }


def _wait_idle(aengine: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while aengine.num_in_flight > 0 or aengine.engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_bursts(
    bursts: list[int],
    *,
    ttft_slo: float | None = 5.0,
    max_tokens: int = 16,
    library: str | None = "demo",
    library_share: float = 0.5,
    engine: Any = None,
    engine_kwargs: dict[str, Any] | None = None,
    model: str | None = None,
    warmup: tuple[int, ...] = (2, 8, 24),
    unload_library: bool = True,
    max_queue: int | None = None,
    library_risk: float = 1.5,
    timeout_s: float = 600.0,
    probe_interval_s: float = 0.25,
    client_process: bool = True,
    seed: int = 0,
) -> dict:
    """Run the bursts; returns the report (per-burst figures under "bursts")."""
    from moska.server.admission import AdmissionController, EngineLimits
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    tmp = None
    if engine is None:
        from moska.engine.llm_engine import LLMEngine

        kwargs = dict(engine_kwargs or {})
        if library is not None and "library_root" not in kwargs:
            tmp = tempfile.TemporaryDirectory(prefix="moska-load-")
            kwargs["library_root"] = tmp.name
        engine = LLMEngine.from_model(model, **kwargs)
    if library == "demo" and getattr(engine, "libraries", None) is not None:
        from moska.library.demo import ensure_demo_library

        ensure_demo_library(engine.libraries)
    settings = ServerSettings(ttft_slo=ttft_slo or None, max_queue=max_queue)
    admission = AdmissionController(
        settings.ttft_slo,
        max_queue,
        limits=EngineLimits.of(engine),
        library_risk=library_risk,
    )
    app = create_app(engine, settings, admission=admission)
    state = app.state.moska
    rng = random.Random(seed)
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn")) if client_process else None
    report: dict[str, Any] = {"bursts": [], "warmup_waves": list(warmup)}
    try:
        with background_server(app) as url:
            model_name = state.model_name

            def bodies(n: int, alternate: bool = False) -> list[dict]:
                # warm-up waves alternate plain and library requests so both are learned
                return [
                    make_body(
                        rng,
                        model_name,
                        max_tokens,
                        library
                        if library and (i % 2 if alternate else rng.random() < library_share)
                        else None,
                        rng.randrange(2**31),
                    )
                    for i in range(n)
                ]

            probe = probe_bodies(
                lambda r, lib: make_body(r, model_name, max_tokens, lib, 0),
                random.Random(seed + 1),
                library,
            )
            for n in warmup:  # teach the step-time model; not reported
                burst_in_process(pool, url, bodies(n, True), probe, timeout_s, probe_interval_s)
                _wait_idle(state.async_engine, timeout_s)
            if library and unload_library and hasattr(engine.libraries, "unload"):
                engine.libraries.unload(library)
            report["step_model_after_warmup"] = [float(c) for c in state.admission.model.coef]
            for n in bursts:
                before = len(state.admission.outcomes.pairs)
                t0 = time.perf_counter()
                out = burst_in_process(pool, url, bodies(n), probe, timeout_s, probe_interval_s)
                idle = _wait_idle(state.async_engine, timeout_s)
                pairs = list(state.admission.outcomes.pairs)[before:]
                adm = state.admission
                fits = adm.headroom * adm.ttft_slo if adm.ttft_slo else None
                fig = summarize(n, out, pairs, ttft_slo or None, time.perf_counter() - t0, fits)
                fig["engine_idle_after"] = idle
                fig["errors"] = [r["error"] for r in out["requests"] if r["error"]][:5]
                report["bursts"].append(fig)
                print(f"burst {n}: {json.dumps({k: fig[k] for k in _TABLE})}", flush=True)
            report["step_model_final"] = [float(c) for c in state.admission.model.coef]
            report["library_load_tokens_per_s"] = state.admission.load_tps
    finally:
        if pool is not None:
            pool.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return report


_TABLE = (
    "clients",
    "admitted",
    "rejected_429",
    "library_admitted",
    "library_429_only_for_risk",
    "slo_met_share",
    "ttft_p50_s",
    "ttft_p99_s",
    "retry_after_s_median",
    "observed_drain_s_median",
    "retry_after_within_2x_share",
    "retry_after_ms_within_2x_share",
    "predictor_error_s_p10_p50_p90_p99",
)


def table(report: dict) -> str:
    """The report's bursts as a Markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "/".join(fmt(x) for x in v)
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(_TABLE) + " |", "|" + " --- |" * len(_TABLE)]
    for fig in report["bursts"]:
        lines.append("| " + " | ".join(fmt(fig[k]) for k in _TABLE) + " |")
    return "\n".join(lines)


def check(report: dict) -> None:
    """AssertionError unless every admitted request completed and nothing failed or hung."""
    for fig in report["bursts"]:
        assert fig["failed"] == 0 and fig["hung"] == 0, fig
        assert fig["completed"] == fig["admitted"], fig
        assert fig["admitted"] + fig["rejected_429"] == fig["clients"], fig
        assert fig["engine_idle_after"], fig


def _slo(text: str) -> float | None:
    if text.lower() in ("0", "none", "off"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--ttft-slo must be >= 0 (0 or none: off)")
    return value or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moska bench load",
        description=__doc__,
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--probe-interval", type=float, default=0.25)
    p.add_argument("--in-process-client", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    library = None if args.library.lower() == "none" else args.library
    report = run_bursts(
        [int(x) for x in args.burst.split(",") if x],
        ttft_slo=args.ttft_slo,
        max_tokens=args.max_tokens,
        library=library,
        library_share=args.library_share,
        model=args.model,
        engine_kwargs={"device": args.device},
        warmup=tuple(int(x) for x in args.warmup.split(",") if x),
        max_queue=args.max_queue,
        library_risk=args.library_risk,
        timeout_s=args.timeout,
        probe_interval_s=args.probe_interval,
        client_process=not args.in_process_client,
        seed=args.seed,
    )
    print(table(report))
    if args.out is not None:
        from moska.bench.common import environment

        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "bench": "load",
            "args": {k: str(v) for k, v in vars(args).items()},
            "report": report,
            "environment": environment(argv),
        }
        args.out.write_text(json.dumps(record, indent=2))
    check(report)
    print("OK: every admitted request completed; none failed or hung")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
