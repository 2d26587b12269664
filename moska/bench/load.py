"""Load test of admission control: bursts of streaming clients at once, with and without a
shared library, against the real HTTP server on loopback.

    moska bench load --burst 64,300,1000 --ttft-slo 5 --library demo \\
        --out bench/results/load_bursts_cpu_library.json

Starts the server (the tiny default model unless --model) with a TTFT SLO, warms the
admission's step-time model up with a few small waves, unloads the library (so the first
burst also pays its load), then sends each burst at once from a separate client process.
After a burst's first 429 a prober re-sends a typical request every --probe-interval
seconds until one is admitted (answered without being run: load_probe): that time, minus
when each 429 arrived, is the observed drain its Retry-After is compared with, per kind
(plain / library) and where it was said (at the door, body unread / by admission after
the queue: `drain_by_group`). Reports per burst: admitted, rejected, the share
of admitted requests whose first token came within the SLO, TTFT p50/p99, Retry-After vs
observed drain (and OpenAI's `retry-after-ms`, exact), and the predictor's error
(observed minus predicted server-side TTFT of each admitted request), and for library
429s their predicted TTFT and how many only the library risk factor (--library-risk)
turned away. Checks that nothing accepted was lost, failed or hung. With --obey-retries N
the clients retry each 429 for real after its retry-after-ms, up to N times, as the OpenAI
SDK's do (load_obey: share admitted on a retry, their SLO share, never admitted).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from moska.bench import load_summary
from moska.bench.load_args import build_parser, switch
from moska.bench.load_client import burst_in_process
from moska.bench.load_drain import probe_bodies
from moska.bench.load_obey import obey_line, obey_table, overall, summarize_obey
from moska.bench.load_summary import TABLE_KEYS, check, groups, own_groups, summarize, table

__all__ = ["check", "main", "make_body", "run_bursts", "summarize", "table"]


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
        # every token's chunk goes out, even one whose text is held back (load_client.one:
        # TTFT is the first token, not the first whole character)
        "logprobs": 0,
    }
    if library is not None:
        body["library"] = library
    return body


def warmup_waves(sizes: tuple[int, ...], library: str | None) -> list[tuple[int, float]]:
    """The warm-up waves: (requests, share on the library), each size once plain only and,
    with a library, once library only. Why apart: the step-time fit (step_model) needs
    steps whose mix of plain and library tokens differs to tell a prompt token's cost from
    a library pair's; waves that alternated the two gave every step the same 50/50 mix,
    so the split between the two was left to noise (the fitted cost per 1K prompt tokens
    came out 0.14 s in session 13's last 1,000-client run and 0.64 s in one of session 14,
    where a 4,095-token plain prefill step was predicted 4.6 s and ran 1.2 s, and plain
    retries were kept out until it ended)."""
    return [(n, share) for n in sizes for share in ((0.0, 1.0) if library else (0.0,))]


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
    door_lag: bool = True,
    door_storm: bool = False,
    timeout_s: float = 600.0,
    probe_interval_s: float = 0.25,
    client_process: bool = True,
    seed: int = 0,
    trace: bool = False,
    engine_share: float | None = None,
    checkpoint: Any = None,
    door_rate: str | None = None,
    promise_learning: bool = False,
    door_open: bool = False,
    door_anchor: str = "door",
    storm_bound: bool | None = None,
    booked_headroom: float | None = None,
    booked_by_send: bool = False,
    door_early: str = "off",
    obey_retries: int = 0,
    bookings: bool = True,
    gc_freeze: bool = True,
    rebook_within: float | None = None,
    space_by_booked: bool | None = None,
) -> dict:
    """Run the bursts; returns the report (per-burst figures under "bursts").
    `engine_share`: the door's count of admits ahead (burst_admits.ENGINE_SHARE; None: the
    default), an A/B; `door_rate`: the door's time per answer, "sums" (the default) or
    "mean" (before session 16: door_backlog.DoorBacklog.rate), an A/B. `checkpoint(report)` is called after each burst (the CLI writes the
    JSON then: a run cut short by a timeout keeps the bursts it finished). `obey_retries`
    > 0: clients retry their 429s for real after each promise, up to that many times, as the
    OpenAI SDK's do (load_obey; figures under each burst's "obey" and "obey_overall")."""
    from moska.bench.load_probe import DryProbeAdmission, ProbeTag
    from moska.bench.load_trace import PortTag, TracingAdmission, breakdown
    from moska.server.admission import EngineLimits
    from moska.server.app import create_app, engine_defaults
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
    if hasattr(engine, "capture_graphs"):  # as `moska serve` starts (0 on CPU)
        engine.capture_graphs(progress=False)
    settings = ServerSettings(
        ttft_slo=ttft_slo or None,
        max_queue=max_queue,
        retry_bookings=bookings,
        gc_freeze=gc_freeze,  # (A/B: --gc-freeze off)
    )
    admission = (TracingAdmission if trace else DryProbeAdmission)(
        settings.ttft_slo,
        max_queue,
        limits=EngineLimits.of(engine),
        library_risk=library_risk,
    )
    admission.door_lag, admission.door_storm = door_lag, door_storm  # A/B of the door's drain
    admission.promises.enabled = promise_learning  # admission_promises (A/B)
    admission.door_open = door_open  # a drain's door wait: until it opens, or empties (A/B)
    admission.door_anchor = door_anchor  # the step in progress ends with the storm (A/B)
    engine_defaults(admission, engine)  # the server's; None below keeps them
    if storm_bound is not None:  # a new request's overrun lasts the backlog (A/B)
        admission.storm_bound = storm_bound
    if booked_headroom is not None:  # a booked retry's share of the SLO (A/B)
        admission.booked_headroom = booked_headroom
    admission.booked_by_send = booked_by_send  # early or on time by its send (A/B)
    admission.bookings.rebook_within = rebook_within  # a refused retry's new moment (A/B)
    if space_by_booked is not None:  # booked moments' spacing (A/B)
        admission.space_by_booked = space_by_booked
    admission.door_early = admission.door_library = door_early != "off"  # door_early.py
    admission.door_all = door_early == "all"  # the early door's probe behind all inside (A/B)
    if engine_share is not None:
        admission.engine_share = engine_share
    report_share = admission.engine_share
    if door_rate is not None:
        from moska.server.door_backlog import DoorBacklog

        DoorBacklog.rate = door_rate  # the class's: the middleware makes its own
    app = create_app(engine, settings, admission=admission)
    state = app.state.moska
    tag = PortTag(app) if trace else None  # load_trace: joins server and client records
    rng = random.Random(seed)
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn")) if client_process else None
    report: dict[str, Any] = {"bursts": [], "warmup_waves": list(warmup)}
    report["engine_share"] = report_share
    report["door_rate"] = door_rate or "sums"
    report["storm_bound"] = admission.storm_bound  # as resolved (auto: on for a GPU engine)
    report["space_by_booked"] = admission.space_by_booked  # as resolved (auto: on for CPU)
    report["booked_headroom"] = admission.booked_headroom  # as resolved (None: headroom)
    try:
        with background_server(ProbeTag(tag or app)) as url:  # probes run dry (load_probe)
            model_name = state.model_name

            def bodies(n: int, share: float = library_share) -> list[dict]:
                # `share` of them (at random) on the library
                return [
                    make_body(
                        rng,
                        model_name,
                        max_tokens,
                        library if library and rng.random() < share else None,
                        rng.randrange(2**31),
                    )
                    for i in range(n)
                ]

            probe = probe_bodies(
                lambda r, lib: make_body(r, model_name, max_tokens, lib, 0),
                random.Random(seed + 1),
                library,
            )
            for n, share in warmup_waves(warmup, library):  # the step-time model; unreported
                burst_in_process(
                    pool, url, bodies(n, share), probe, timeout_s, probe_interval_s, False
                )
                _wait_idle(state.async_engine, timeout_s)
            if library and unload_library and hasattr(engine.libraries, "unload"):
                engine.libraries.unload(library)
            report["step_model_after_warmup"] = [float(c) for c in state.admission.model.coef]
            for n in bursts:
                before = len(state.admission.outcomes.pairs)
                mark = admission.mark() if isinstance(admission, TracingAdmission) else None
                door_before = load_summary.door_state(state)
                t0 = time.perf_counter()
                out = burst_in_process(
                    pool, url, bodies(n), probe, timeout_s, probe_interval_s, True, obey_retries
                )
                idle = _wait_idle(state.async_engine, timeout_s)
                pairs = list(state.admission.outcomes.pairs)[before:]
                adm = state.admission
                fits = adm.headroom * adm.ttft_slo if adm.ttft_slo else None
                wall = time.perf_counter() - t0
                fig = summarize(n, out, pairs, ttft_slo or None, wall, fits, probe_interval_s)
                fig["engine_idle_after"] = idle
                fig["promise_scale"] = admission.promises.state()
                fig["bookings"] = admission.bookings.state()  # totals so far (bookings.py)
                fig["door_state"] = {"before": door_before, "after": load_summary.door_state(state)}
                fig["errors"] = [r["error"] for r in out["requests"] if r["error"]][:5]
                if obey_retries:  # clients that obey retry-after-ms (load_obey)
                    fig["obey"] = summarize_obey(out["requests"], ttft_slo or None, obey_retries)
                    report["obey_overall"] = overall([f["obey"] for f in report["bursts"] + [fig]])
                    print(f"burst {n} obeying clients: {obey_line(fig['obey'])}", flush=True)
                if mark and ttft_slo and tag and isinstance(admission, TracingAdmission):
                    fig["trace"] = breakdown(admission, tag, mark, out, ttft_slo)  # load_trace
                report["bursts"].append(fig)
                print(f"burst {n}: {json.dumps({k: fig[k] for k in TABLE_KEYS})}", flush=True)
                print(f"burst {n} Retry-After within 2x: {groups(fig)}", flush=True)
                print(f"burst {n} own retries: {own_groups(fig)}", flush=True)
                if checkpoint is not None:
                    checkpoint(report)
            report["step_model_final"] = [float(c) for c in state.admission.model.coef]
            report["library_load_tokens_per_s"] = state.admission.load_tps
    finally:
        if isinstance(admission, TracingAdmission):
            admission.close()  # its garbage-collector callback
        if pool is not None:
            pool.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return report


def main(argv: list[str] | None = None) -> int:
    p = build_parser(__doc__)
    args = p.parse_args(argv)
    if args.obey_retries < 0:
        p.error("--obey-retries must be >= 0 (0: clients do not retry)")
    library = None if args.library.lower() == "none" else args.library

    def write(report: dict) -> None:
        if args.out is None:
            return
        from moska.bench.common import environment

        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "bench": "load",
            "args": {k: str(v) for k, v in vars(args).items()},
            "report": report,
            "environment": environment(argv),
        }
        part = args.out.with_name(args.out.name + ".part")  # whole or not at all (timeouts)
        part.write_text(json.dumps(record, indent=2))
        part.replace(args.out)

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
        door_lag=args.door_lag == "on",
        door_storm=args.door_storm == "on",
        timeout_s=args.timeout,
        probe_interval_s=args.probe_interval,
        client_process=not args.in_process_client,
        seed=args.seed,
        trace=args.trace,
        engine_share=args.engine_share,
        checkpoint=write,
        door_rate=args.door_rate,
        promise_learning=args.promise_learning == "on",
        door_open=args.door_wait == "open",
        door_anchor=args.door_anchor,
        storm_bound=switch(args.storm_bound),
        booked_headroom=args.booked_headroom,
        booked_by_send=args.booked_by_send == "on",
        gc_freeze=args.gc_freeze == "on",
        rebook_within=args.rebook_within,
        space_by_booked=switch(args.space_by_booked),
        door_early=args.door_early,
        obey_retries=args.obey_retries,
        bookings=args.bookings == "on",
    )
    print(table(report))
    if args.obey_retries:
        print(obey_table(report))
    write(report)
    check(report)
    print("OK: every admitted request completed; none failed or hung")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
