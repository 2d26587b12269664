"""The front end (`moska router`): the OpenAI API in front of prefill and decode instances.

A request in P/D mode: the global scheduler (`pd/scheduler.py`) picks the prefill and the
decode instance or answers 429 with Retry-After before any work is spent; the prefill
instance runs the client's body with max_tokens 1 (one prefill at a time per instance, in
admission order: `pd/prefill_gate.py`) and sends the prompt's KV blocks to the
decode instance (`pd/instance.py`); the front end waits for the send and for the decode
instance to take the blocks into its prefix cache, then sends the client's body to the
decode instance and streams its answer back. A transfer that fails (after the sender's own
retry) is re-prefilled once for another decode instance; then the request fails with 503.
A decode instance that dies (its process gone, or /pd/info failing twice) is taken out of
the scheduler, and the requests streaming from it end with an error at once (the stream
relay, and what the scheduler learns from it, is `pd/relay.py`).

Round-robin mode (`--both`): the colocated baseline, each request to the next live
instance, whole. The HTTP app around it is `pd/frontend_app.py`; the client-facing bodies
and headers are `pd/frontend_http.py`, awaiting an instance that may die `pd/instance_death.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from moska.pd.decisions import MAX_DECISIONS, decision_record
from moska.pd.frontend_http import (
    DEFAULT_MAX_TOKENS,
    TRANSFER_HEADER,
    error_response,
    predicted_headers,
    prompt_tokens,
)
from moska.pd.index import block_hashes
from moska.pd.instance_death import InstanceDied, or_dead
from moska.pd.prefill_gate import PrefillGate
from moska.pd.relay import relay
from moska.pd.retry import next_decode
from moska.pd.scheduler import GlobalScheduler, Instance, Plan, Rejection, RequestInfo
from moska.pd.token_times import with_usage

logger = logging.getLogger(__name__)


_RETRY_HEADERS = ("retry-after", "retry-after-ms")  # passed on from the instances


@dataclass(frozen=True)
class FrontEndConfig:
    transfer_timeout_s: float = 10.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    # prefills in flight per prefill instance (`prefill_gate.py`); 0: no gate, every
    # admitted prefill is sent at once and the instance batches those waiting
    prefill_width: int = 1


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefill instances found in their caches
    transferred_blocks: int = 0
    transfer_failures: int = 0
    reprefills: int = 0
    decode_prefills: int = 0  # transfers failed twice: the decode instance prefilled
    failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    prefill_stage_s: float = 0.0  # sum over requests: prefill + transfer, as seen here
    first_token_s: float = 0.0  # sum: decode request sent -> its first chunk
    staged: int = 0
    # per request: the admission's inputs and predictions and, for an admitted one, the
    # stage times seen (`pd/decisions.py`)
    decisions: list[dict] = field(default_factory=list)


class FrontEnd:
    def __init__(
        self,
        instances: list[Instance],
        scheduler: GlobalScheduler | None,
        config: FrontEndConfig = FrontEndConfig(),
        processes: dict | None = None,
    ) -> None:
        self.instances = instances
        self.scheduler = scheduler  # None: round-robin over `both` instances
        self.config = config
        self.processes = processes or {}  # instance name -> Popen (instances we started)
        self.stats = Stats()
        self._dead: dict[str, asyncio.Event] = {}
        self._tids = itertools.count(int(time.time() * 1000) % 1_000_000 * 1000)
        self._rr = itertools.count()
        self.client: httpx.AsyncClient | None = None
        self._monitor: asyncio.Task | None = None
        self._gates: dict[str, PrefillGate] = {}  # prefill instance -> its gate (started)
        if scheduler is not None:
            scheduler.gate_width = max(0, config.prefill_width)

    @property
    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, once started."""
        assert self.client is not None, "the front end is not started"
        return self.client

    @property
    def _sched(self) -> GlobalScheduler:
        """The global scheduler (P/D mode; round-robin has none)."""
        assert self.scheduler is not None, "no global scheduler in round-robin mode"
        return self.scheduler

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=self.config.request_timeout_s, limits=limits)
        self._dead = {i.name: asyncio.Event() for i in self.instances}
        if self.config.prefill_width > 0:
            self._gates = {i.name: PrefillGate(self.config.prefill_width) for i in self.instances}
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self.client is not None:
            await self.client.aclose()

    # ---- health ----------------------------------------------------------------------
    def _kill(self, inst: Instance, why: str) -> None:
        if not inst.alive:
            return
        logger.error("instance %s (%s) is out: %s", inst.name, inst.role, why)
        inst.alive = False
        if self.scheduler is not None:
            self._sched.mark_dead(inst)
        self._dead[inst.name].set()

    async def _watch(self) -> None:
        misses: dict[str, int] = {}
        while True:
            for inst in [i for i in self.instances if i.alive]:
                proc = self.processes.get(inst.name)
                if proc is not None and proc.poll() is not None:
                    self._kill(inst, f"its process exited ({proc.returncode})")
                    continue
                try:
                    r = await self._http.get(
                        f"{inst.url}/pd/info", timeout=self.config.health_timeout_s
                    )
                    misses[inst.name] = 0 if r.status_code == 200 else misses.get(inst.name, 0) + 1
                    if r.status_code == 200 and self.scheduler is not None:
                        coef = r.json().get("step_coef")
                        if coef:  # the instance's own step-time fit
                            self._sched.set_step_coef(inst, coef)
                except httpx.ConnectError:
                    misses[inst.name] = 2
                except httpx.HTTPError:
                    misses[inst.name] = misses.get(inst.name, 0) + 1
                if misses.get(inst.name, 0) >= 2:
                    self._kill(inst, "its /pd/info failed twice")
            await asyncio.sleep(self.config.health_interval_s)

    # ---- requests --------------------------------------------------------------------
    async def handle(self, kind: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object")
        self.stats.requests += 1
        path = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
        if self.scheduler is None:
            live = [i for i in self.instances if i.alive]
            if not live:
                return error_response(503, "no live instance; restart them")
            inst = live[next(self._rr) % len(live)]
            return await self._proxy(inst, path, body, None, None)
        return await self._disaggregated(kind, path, body)

    async def _disaggregated(self, kind: str, path: str, body: dict) -> Response:
        if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
            return error_response(400, "n > 1 is not supported by the P/D front end yet", param="n")
        try:
            tokens = prompt_tokens(kind, body)
        except ValueError as exc:
            return error_response(400, f"'{exc}' is missing or not a single prompt", param=str(exc))
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        max_tokens = max_tokens if isinstance(max_tokens, int) else DEFAULT_MAX_TOKENS
        bs = self._sched.live("prefill")[0].block_size if self._sched.live("prefill") else 16
        namespace = (body.get("library"), body.get("top_k_chunks"))
        info = RequestInfo(tuple(block_hashes(tokens, bs, namespace)), len(tokens), max_tokens)
        t_admit = time.monotonic()
        plan = self._sched.plan(info, t_admit)
        record = self._record(plan, info, t_admit)
        if isinstance(plan, Rejection) and plan.reason == "too_large":
            return error_response(
                400,
                "the prompt plus max_tokens needs more KV than any decode instance holds; "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        if isinstance(plan, Rejection):
            self.stats.rejected[plan.reason] = self.stats.rejected.get(plan.reason, 0) + 1
            return error_response(
                429,
                f"the cluster would miss its SLO ({plan.reason}: predicted time to first token "
                f"{plan.predicted_ttft_s:.2f} s, per output token {plan.predicted_tpot_s:.3f} s);"
                f" retry after {plan.retry_after_s} s",
                headers={
                    "Retry-After": str(plan.retry_after_s),
                    "retry-after-ms": str(plan.retry_after_ms),
                },
            )
        decode = plan.decode
        tid: int | None = None
        try:  # a failed transfer re-prefills, then the decode side prefills (pd/retry.py)
            for attempt in range(2):
                tid = next(self._tids)
                out = await self._prefill(plan, path, body, tid, decode)
                if isinstance(out, Response):  # the prefill instance refused the body
                    self._sched.finished(plan, decode)
                    return out
                if out is None:
                    break
                self.stats.transfer_failures += 1
                logger.warning("transfer %d to %s failed: %s", tid, decode.name, out)
                if "gone" in out or "connect" in out.lower():
                    self._kill(decode, out)
                else:  # a hold its accept may have made after all (it expires otherwise)
                    asyncio.create_task(self._release(decode, tid))
                if (moved := next_decode(self._sched, plan, decode, max_tokens)) is None:
                    self._sched.finished(plan, decode)
                    self.stats.failed += 1
                    return error_response(
                        503, f"the KV transfer failed ({out}) and no decode instance is left"
                    )
                decode, tid = moved, None
                self.stats.reprefills += attempt == 0
                self.stats.decode_prefills += attempt == 1
        except httpx.HTTPError as exc:
            self._sched.finished(plan, decode)
            self._kill(plan.prefill, f"unreachable ({exc})")
            self.stats.failed += 1
            return error_response(503, f"the prefill instance failed ({exc}); retry the request")
        self._sched.prefill_done(plan)
        stage_s = time.monotonic() - t_admit
        record["observed_stage_s"] = round(stage_s, 4)
        self.stats.prefill_stage_s += stage_s
        self.stats.staged += 1
        self._sched.observe_prefill(plan, stage_s, time.monotonic())
        # the stream's usage chunk counts its tokens for the TPOT factor (token_times.py)
        decode_body, strip = with_usage(body)
        return await self._proxy(decode, path, decode_body, plan, tid, strip, record)

    def _record(self, plan: Plan | Rejection, info: RequestInfo, now: float) -> dict:
        """The decision's entry in the log (`Stats.decisions`, the first MAX_DECISIONS)."""
        rec = decision_record(plan, info.prompt_tokens, now, self._sched.last_inputs)
        if len(self.stats.decisions) < MAX_DECISIONS:
            self.stats.decisions.append(rec)
        return rec

    async def _prefill(self, plan: Plan, path: str, body: dict, tid: int, decode: Instance):
        """None when the KV reached `decode`; an error string when the transfer failed; the
        prefill instance's own error response when it refused the body."""
        pre = {k: v for k, v in body.items() if k not in ("stream_options", "best_of")}
        pre |= {"max_tokens": 1, "stream": False, "n": 1}
        pre.pop("max_completion_tokens", None)
        headers = {TRANSFER_HEADER: f"{tid}:{decode.rank}"}
        p = plan.prefill
        gate = self._gates.get(p.name)
        if gate is None:
            r = await self._http.post(f"{p.url}{path}", json=pre, headers=headers)
        else:  # one at a time, in admission order (`prefill_gate.py`)
            async with gate.turn(lambda: self._sched.prefill_started(plan, time.monotonic())):
                r = await self._http.post(f"{p.url}{path}", json=pre, headers=headers)
        self._sched.prefill_computed(plan, time.monotonic())
        if r.status_code != 200:
            hdrs = {k: v for k, v in r.headers.items() if k.lower() in _RETRY_HEADERS}
            return Response(r.content, r.status_code, hdrs, media_type="application/json")
        t = self.config.transfer_timeout_s
        accept = asyncio.create_task(
            self._http.post(f"{decode.url}/pd/accept/{tid}", params={"timeout": t})
        )
        try:
            sent = await self._http.get(f"{p.url}/pd/transfer/{tid}", params={"timeout": t})
            result = sent.json()
            if sent.status_code != 200:
                accept.cancel()
                return str(result.get("error"))
            acc = await accept
        except httpx.HTTPError as exc:
            accept.cancel()
            return f"could not connect to the decode instance: {exc}"
        if acc.status_code != 200:
            return str(acc.json().get("error"))
        self.stats.prompt_tokens += int(result.get("prompt_tokens", 0))
        self.stats.cached_tokens += int(result.get("cached_tokens", 0))
        self.stats.transferred_blocks += int(result.get("blocks", 0))
        self._sched.transferred(int(result.get("blocks", 0)), float(result.get("seconds", 0)))
        return None

    async def _proxy(
        self,
        inst: Instance,
        path: str,
        body: dict,
        plan: Plan | None,
        tid: int | None,
        strip: bool = False,
        record: dict | None = None,
    ) -> Response:
        """Send `body` to `inst` and relay its answer (SSE as it comes)."""
        dead, sent_at = self._dead[inst.name], time.monotonic()
        try:
            req = self._http.build_request("POST", f"{inst.url}{path}", json=body)
            resp = await or_dead(self._http.send(req, stream=True), dead)
        except (httpx.HTTPError, InstanceDied) as exc:
            return await self._failed(inst, plan, tid, exc)
        if resp.status_code != 200 or not body.get("stream"):
            try:
                content = await or_dead(resp.aread(), dead)
            except (httpx.HTTPError, InstanceDied) as exc:
                return await self._failed(inst, plan, tid, exc)
            await self._end(inst, plan, tid)
            hdrs = {k: v for k, v in resp.headers.items() if k.lower() in _RETRY_HEADERS}
            return Response(content, resp.status_code, hdrs, media_type="application/json")
        return StreamingResponse(
            self._relay(inst, resp, plan, tid, sent_at, strip, record),
            media_type="text/event-stream",
            headers=predicted_headers(plan),
        )

    # the SSE relay of a streamed answer (`pd/relay.py`); a method, so tests call `_relay`
    _relay = relay

    async def _end(self, inst, plan, tid) -> None:
        if tid is not None:
            await self._release(inst, tid)
        if plan is not None:
            self._sched.finished(plan, inst)

    async def _failed(self, inst, plan, tid, exc) -> Response:
        self.stats.failed += 1
        if isinstance(exc, httpx.ConnectError | InstanceDied | httpx.RemoteProtocolError):
            self._kill(inst, f"{type(exc).__name__}: {exc}")
        if plan is not None:
            self._sched.finished(plan, inst)
        return error_response(
            503, f"instance {inst.name} failed ({type(exc).__name__}); retry the request"
        )

    async def _release(self, inst: Instance, tid: int) -> None:
        try:
            await self._http.post(f"{inst.url}/pd/release/{tid}", timeout=5.0)
        except httpx.HTTPError:  # it expires on its own (hold_s)
            logger.debug("release of transfer %d failed", tid, exc_info=True)
