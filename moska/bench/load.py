"""Bounded load test of the HTTP server: many concurrent streaming clients on loopback.

Starts the real server (the tiny default model unless --model) on a free loopback port
with a TTFT SLO, sends a fixed number of streaming completions from `concurrency`
closed-loop clients, stops by itself, prints the figures and checks that every accepted
request completed (ended with a finish reason and [DONE]), the rest got 429 with
Retry-After, and none failed or hung.

    python -m moska.bench.load --requests 200 --concurrency 64 --rate 50 --ttft-slo 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoadResult:
    requests: int
    accepted: int
    completed: int
    rejected: int
    failed: int
    hung: int
    wall_s: float
    p50_latency_s: float
    p99_latency_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    completion_tokens: int
    retry_after_ok: bool
    engine_idle_after: bool
    errors: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raises AssertionError unless nothing accepted was lost and nothing hung."""
        assert self.failed == 0 and self.hung == 0, (self.failed, self.hung, self.errors[:5])
        assert self.completed == self.accepted, (self.completed, self.accepted)
        assert self.accepted + self.rejected == self.requests
        assert self.retry_after_ok, "a 429 came without a Retry-After header"
        assert self.engine_idle_after, "the engine still had requests after the run"

    def table(self) -> str:
        rows = [
            ("requests", self.requests),
            ("accepted", self.accepted),
            ("completed", self.completed),
            ("rejected (429)", self.rejected),
            ("failed", self.failed),
            ("hung", self.hung),
            ("wall s", f"{self.wall_s:.2f}"),
            ("latency p50 s", f"{self.p50_latency_s:.3f}"),
            ("latency p99 s", f"{self.p99_latency_s:.3f}"),
            ("TTFT p50 s", f"{self.p50_ttft_s:.3f}"),
            ("TTFT p99 s", f"{self.p99_ttft_s:.3f}"),
            ("completion tokens", self.completion_tokens),
            ("tokens/s", f"{self.completion_tokens / max(self.wall_s, 1e-9):.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _one(client: Any, url: str, body: dict, timeout_s: float, out: dict) -> None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code == 429:
                    await r.aread()
                    out["rejected"] += 1
                    out["retry_after_ok"] &= r.headers.get("retry-after", "").isdigit()
                    return
                if r.status_code != 200:
                    out["failed"] += 1
                    out["errors"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    return
                out["accepted"] += 1
                ttft, finish, done, tokens = None, None, False, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out["errors"].append(str(chunk["error"]))
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if ttft is None and choice["text"]:
                            ttft = time.perf_counter() - t0
                        finish = choice["finish_reason"] or finish
                if done and finish is not None:
                    out["completed"] += 1
                    out["latency"].append(time.perf_counter() - t0)
                    out["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
                    out["tokens"] += tokens
                else:
                    out["failed"] += 1
                    out["errors"].append(f"stream ended without finish/[DONE] ({finish}, {done})")
    except TimeoutError:
        out["hung"] += 1
    except Exception as exc:  # noqa: BLE001 - counted and reported
        out["failed"] += 1
        out["errors"].append(f"{type(exc).__name__}: {exc}")


async def _drive(
    url: str,
    model: str,
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    timeout_s: float,
    seed: int,
    rate: float | None,
) -> dict:
    import httpx

    rng = random.Random(seed)
    bodies = [
        {
            "model": model,
            "prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(8, 256))),
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        for i in range(num_requests)
    ]
    out: dict[str, Any] = {
        "accepted": 0,
        "completed": 0,
        "rejected": 0,
        "failed": 0,
        "hung": 0,
        "latency": [],
        "ttft": [],
        "tokens": 0,
        "errors": [],
        "retry_after_ok": True,
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        if rate is None:  # closed loop: `concurrency` clients, each sends its next at once
            queue: asyncio.Queue = asyncio.Queue()
            for b in bodies:
                queue.put_nowait(b)

            async def worker() -> None:
                while not queue.empty():
                    await _one(client, url, queue.get_nowait(), timeout_s, out)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:  # open loop: Poisson arrivals at `rate` per second, at most `concurrency` open
            slots = asyncio.Semaphore(concurrency)

            async def send(body: dict) -> None:
                async with slots:
                    await _one(client, url, body, timeout_s, out)

            tasks = []
            for body in bodies:
                tasks.append(asyncio.create_task(send(body)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
    return out


def run_load(
    *,
    num_requests: int = 200,
    concurrency: int = 64,
    max_tokens: int = 32,
    ttft_slo: float | None = 0.5,
    max_queue: int | None = None,
    model: str | None = None,
    engine: Any = None,
    engine_kwargs: dict[str, Any] | None = None,
    request_timeout_s: float = 120.0,
    seed: int = 0,
    rate: float | None = None,
) -> LoadResult:
    """Start a server, drive it, stop it; returns the figures (call `.check()`)."""
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    if engine is None:
        from moska.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_model(model, **(engine_kwargs or {}))
    settings = ServerSettings(ttft_slo=ttft_slo, max_queue=max_queue or 100_000)
    app = create_app(engine, settings)
    with background_server(app) as url:
        t0 = time.perf_counter()
        out = asyncio.run(
            _drive(
                url,
                app.state.moska.model_name,
                num_requests,
                concurrency,
                max_tokens,
                request_timeout_s,
                seed,
                rate,
            )
        )
        wall = time.perf_counter() - t0
    idle = not engine.has_unfinished_requests()
    return LoadResult(
        requests=num_requests,
        accepted=out["accepted"],
        completed=out["completed"],
        rejected=out["rejected"],
        failed=out["failed"],
        hung=out["hung"],
        wall_s=wall,
        p50_latency_s=_percentile(out["latency"], 0.50),
        p99_latency_s=_percentile(out["latency"], 0.99),
        p50_ttft_s=_percentile(out["ttft"], 0.50),
        p99_ttft_s=_percentile(out["ttft"], 0.99),
        completion_tokens=out["tokens"],
        retry_after_ok=out["retry_after_ok"],
        engine_idle_after=idle,
        errors=out["errors"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moska.bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="HF model directory (default: tiny)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="Poisson arrivals per second; 0: closed loop, all clients at once",
    )
    p.add_argument("--ttft-slo", type=float, default=1.0, help="seconds; 0 disables")
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    result = run_load(
        num_requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        ttft_slo=args.ttft_slo or None,
        max_queue=args.max_queue,
        model=args.model,
        engine_kwargs={"device": args.device},
        request_timeout_s=args.timeout,
        seed=args.seed,
        rate=args.rate or None,
    )
    print(result.table())
    if args.json is not None:
        from moska.bench.common import environment

        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "bench": "load",
            "args": {k: str(v) for k, v in vars(args).items()},
            "result": asdict(result),
            "environment": environment(argv),
        }
        args.json.write_text(json.dumps(record, indent=2))
    result.check()
    print("OK: every accepted request completed; none failed or hung")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
