"""`moska bench load --trace`: where an admitted request's time to first token went, and
what the server knew when it said a 429's drain.

Why: at 1,000 clients (CPU, SLO 5 s) 9% of admitted requests missed the SLO and no plain
429's promise was within 2x of the drain the bench observed, and the summary alone cannot
say whether the predictor was wrong, the request waited before the server saw it, or its
first token sat on the event loop before it reached the client. So the controller is
wrapped (`TracingAdmission`) to record each decision (when, what it had spent, what it
predicted, the engine's queue and the door) and each first token (when, predicted,
observed), and `breakdown` joins them with the client's records: per admitted request
write -> arrival (connection and HTTP parsing before the server's clock starts),
arrival -> decision, decision -> first token (predicted and observed), and server first
token -> client (delivery). Times are on the machine's monotonic clock (the client's
`perf_counter` is the same clock on Linux: `t0`).
"""

from __future__ import annotations

import gc
import time
from contextvars import ContextVar
from typing import Any

from moska.bench.load_probe import DryProbeAdmission
from moska.server.admission import Decision
from moska.server.load_shedding import ARRIVAL
from moska.server.queue_replay import Load, RequestCost
from moska.server.step_model import StepFeatures

# the client port of the HTTP request being handled (set by `PortTag`): joins the server's
# records of a request with the client's
PORT: ContextVar[int | None] = ContextVar("moska_bench_port", default=None)


class PortTag:
    """ASGI wrapper around the server's app: tags each request with its client port
    (`PORT`) and records, per port, when the app was called (`called`: the connection
    accepted and its request line and headers parsed) and when the first body chunk after
    the status went out (`first_body`: the first SSE event, the first token on
    completions)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.called: dict[int, float] = {}  # the last request from each port (ports recur)
        self.first_body: dict[int, float] = {}
        self.status_sent: dict[int, tuple[int, float]] = {}  # (status, when its start went out)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        if not client:
            await self.app(scope, receive, send)
            return
        port = client[1]
        self.called[port] = time.monotonic()
        self.first_body.pop(port, None)
        token = PORT.set(port)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status_sent[port] = (int(message["status"]), time.monotonic())
            if (
                message["type"] == "http.response.body"
                and message.get("body")
                and port not in self.first_body
            ):
                self.first_body[port] = time.monotonic()
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            PORT.reset(token)


class TracingAdmission(DryProbeAdmission):
    """The controller (its probes answered dry, `load_probe`), recording its decisions (`decisions`), door rejections (`sheds`)
    and first tokens (`firsts`). For benches only: the records grow without bound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: list[dict[str, Any]] = []
        self.sheds: list[dict[str, Any]] = []
        self.firsts: list[tuple[float, float, float]] = []
        # (when, seconds, predicted, features, one-off: a graph capture or kernel compile)
        self.steps: list[tuple[float, float, float, tuple[int, ...], bool]] = []
        # the collector's pauses (start, seconds, generation): they stop every thread
        self.gc_pauses: list[tuple[float, float, int]] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._gc_event)

    def close(self) -> None:
        """Stop recording the collector's pauses (its callback holds this object)."""
        if self._gc_event in gc.callbacks:
            gc.callbacks.remove(self._gc_event)

    def _gc_event(self, phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_start = now
        elif now - self._gc_start >= 0.002:
            self.gc_pauses.append((self._gc_start, now - self._gc_start, info["generation"]))

    def observe_step(self, seconds: float, features: StepFeatures, warmup: bool = False) -> None:
        predicted = self.step_s(features)  # what admission planned with (the factor in)
        super().observe_step(seconds, features, warmup)
        self.steps.append((time.monotonic(), seconds, predicted, tuple(features), warmup))

    def decide(
        self,
        new: RequestCost | int,
        load: Load,
        num_requests: int = 1,
        elapsed_s: float = 0.0,
        key: bytes | None = None,
    ) -> Decision:
        t, inside, scale, margin = (
            time.monotonic(),
            self.door.inside,
            self.slowdown,
            self.margin.seconds,
        )
        d = super().decide(new, load, num_requests, elapsed_s, key)
        cost = RequestCost(new) if isinstance(new, int) else new
        self.decisions.append(
            {
                "t": t,
                "elapsed_s": elapsed_s,
                "arrival": ARRIVAL.get(),
                "port": PORT.get(),
                "predicted_s": d.predicted_ttft_s,
                "accepted": d.accepted,
                "drain_s": d.drain_s,
                "library": cost.library_attend > 0,
                "prompt": cost.prompt_tokens,
                "waiting": load.num_waiting,
                "running": load.num_running,
                "busy_s": load.busy_s,
                "inside": inside,
                "slowdown": scale,
                "margin_s": margin,
                **self._door_view(),
            }
        )
        return d

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        d = super().shed(load, elapsed_s)
        if d is not None:
            self.sheds.append(
                {
                    "t": time.monotonic(),
                    "drain_s": d.drain_s,
                    "predicted_s": d.predicted_ttft_s,
                    "elapsed_s": elapsed_s,
                    "library_drain_s": d.library_drain_s,
                    "inside": self.door.inside,
                    "waiting": load.num_waiting,
                    "slowdown": self.slowdown,
                    **self._door_view(),
                }
            )
        return d

    def _door_view(self) -> dict[str, Any]:
        """What the drains counted as admitted from the door (`burst_admits`), with the
        loop's time per decision it planned with."""
        memo = self._door_memo
        return {"door_admits": memo[3] if memo else None, "gap_s": self.door.gap_s}

    def observe_ttft(self, predicted_s: float, observed_s: float) -> None:
        super().observe_ttft(predicted_s, observed_s)
        self.firsts.append((time.monotonic(), predicted_s, observed_s))

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.decisions), len(self.sheds), len(self.firsts), len(self.steps)


def _pct(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[float] | None:
    if not values:
        return None
    s = sorted(values)
    return [round(s[min(len(s) - 1, round(q * (len(s) - 1)))], 3) for q in qs]


def breakdown(
    adm: TracingAdmission, tag: PortTag, since: tuple[int, int, int, int], out: dict, slo: float
) -> dict:
    """One burst's admitted requests, the server's records from `since` (`mark`) joined
    with the client's (`out`, a `load_client.burst` result) by client port: the parts of
    the client's TTFT (p50/p90/p99 each): written -> app called (accept, HTTP parsing),
    -> arrival stamp -> decision -> engine first token (and what the decision predicted
    for that part) -> first SSE event sent -> client read it; the server's own TTFT share
    within `slo`; the admitted that missed, part by part; and the engine's steps."""
    decisions = {d["port"]: d for d in adm.decisions[since[0] :] if d["accepted"]}
    firsts = {pred: (t, obs) for t, pred, obs in adm.firsts[since[2] :]}
    t0, rows = out["t0"], []
    for c in out["requests"]:
        d = decisions.get(c.get("port"))
        if c["status"] != 200 or c["ttft"] is None or d is None or d["arrival"] is None:
            continue
        first, observed = firsts.get(d["predicted_s"], (None, None))
        sent = tag.first_body.get(c["port"])
        if first is None or sent is None:
            continue
        written = t0 + c["t_start"] + (c["connect_s"] or 0.0)
        rows.append(
            {
                "client_ttft_s": c["ttft"],
                "server_ttft_s": observed,
                "predicted_s": d["predicted_s"],
                "accept_s": tag.called[c["port"]] - written,
                "to_arrival_s": d["arrival"] - tag.called[c["port"]],
                "to_decision_s": d["t"] - d["arrival"],
                "charged_before_s": d["elapsed_s"],
                "engine_observed_s": first - d["t"],
                "engine_predicted_s": d["predicted_s"] - d["elapsed_s"],
                "to_send_s": sent - first,
                "to_client_s": written + c["ttft"] - sent,
                "written_at_s": written - t0,
                "decided_at_s": d["t"] - t0,
                "library": d["library"],
                "waiting": d["waiting"],
                "inside": d["inside"],
                "slowdown": d["slowdown"],
                "margin_s": d["margin_s"],
            }
        )
    missed = [r for r in rows if r["client_ttft_s"] > slo]
    parts = [k for k in (rows[0] if rows else {}) if k.endswith("_s")]
    rounded = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return {
        "joined": len(rows),
        "client_ttft_within_slo_share": 1 - len(missed) / len(rows) if rows else None,
        "server_ttft_within_slo_share": (
            sum(1 for r in rows if r["server_ttft_s"] <= slo) / len(rows) if rows else None
        ),
        "p50_p90_p99": {k: _pct([r[k] for r in rows]) for k in parts},
        "rejected_to_client_s": _pct(rejected_to_client(tag, out)),
        # every first token of the burst (retries too, unjoined): (t, predicted, observed)
        # of those whose server-side TTFT missed the SLO, and how many there were of all
        "firsts": len(adm.firsts) - since[2],
        "firsts_missed": [
            (round(t - t0, 3), round(p, 3), round(o, 3))
            for t, p, o in adm.firsts[since[2] :]
            if o > slo
        ][:200],
        "admitted": sorted(rounded, key=lambda r: -r["client_ttft_s"]),
        "sheds": [
            {
                k: round(v - t0 if k == "t" else v, 3) if isinstance(v, float) else v
                for k, v in x.items()
            }
            for x in adm.sheds[since[1] :]
        ][:: max(1, (len(adm.sheds) - since[1]) // 40)],
        "decisions_rejected": [
            {
                k: round(d[k] - t0 if k == "t" else d[k], 3)
                for k in (
                    "t",
                    "drain_s",
                    "predicted_s",
                    "elapsed_s",
                    "waiting",
                    "inside",
                    "slowdown",
                    "gap_s",
                )
            }
            | {"library": d["library"], "door_admits": d["door_admits"]}
            for d in adm.decisions[since[0] :]
            if not d["accepted"]
        ],
        "steps": [
            {"t": round(t - t0, 3), "s": round(sec, 3), "pred_s": round(p, 3), "f": f, "one_off": w}
            for t, sec, p, f, w in adm.steps[since[3] :]
        ][:400],
        "gc_pauses": [  # collections of 2 ms or more from the burst's start on
            {"t": round(t - t0, 3), "s": round(sec, 3), "gen": g}
            for t, sec, g in adm.gc_pauses
            if t >= t0
        ][:200],
    }


def rejected_to_client(tag: PortTag, out: dict) -> list[float]:
    """Per first attempt answered 429, the seconds from when the server sent its status
    (`PortTag.status_sent`) to when its client read it (`t_status`): a retry timed from the
    client's receipt (the bench's own-retry score) reaches the server this much later on
    the server's clock than the promise says. Joined by port; a port reused since by
    another request (not a 429, or sent after the client read this one) is left out."""
    t0, lags = out["t0"], []
    for c in out["requests"]:
        sent = tag.status_sent.get(c.get("port") or -1)
        if c["status"] != 429 or c.get("t_status") is None or sent is None or sent[0] != 429:
            continue
        lag = t0 + c["t_status"] - sent[1]
        if lag >= 0:
            lags.append(lag)
    return lags
