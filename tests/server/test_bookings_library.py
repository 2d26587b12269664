"""Retry bookings over several bursts with library requests, on the real scheduler over a
virtual clock whose step times are the ones fitted on the device's CPU cores in session 20
(a library request's prefill there takes 0.2-6 s). Clients retry as the OpenAI SDK does:
twice, at their promise, then give up. Session 19's bookings lost the library clients from
the second burst on (one show rate for all fell as the SDK's third 429s lapsed)."""

from __future__ import annotations

import heapq
import random

import numpy as np
from test_admission import BUDGET, MAX_SEQS, VirtualServer

from moska.engine.request import Request
from moska.engine.sampling_params import SamplingParams
from moska.server.admission import AdmissionController, EngineLimits, RequestCost

DEVICE_FIT = np.array([0.0063, 0.068, 5.38, 0.0955, 0.187])  # session 20, call 1
ATTEND = 4380  # the bench's `demo` library, read whole


def _burst(server: VirtualServer, adm: AdmissionController, rng: random.Random, n: int) -> dict:
    """`n` clients at once, half on the library; each refused one retries at its promise
    up to twice. The library clients' share admitted on the first retry, and the SLO share
    of every admitted plain request."""
    t0, slo = server.t, adm.ttft_slo
    lib = [rng.random() < 0.5 for _ in range(n)]
    costs = [RequestCost(rng.randint(8, 256), 16, ATTEND if x else 0) for x in lib]
    tag = rng.randrange(1 << 30)
    due: list[tuple[float, int, int]] = []
    out = {"lib_429": 0, "lib_first_retry": 0, "lib_never": 0, "plain": []}

    def send(client: int, attempt: int) -> None:
        cost = costs[client]
        d = adm.decide(cost, server.load(), key=f"{tag}-{client}".encode())
        if not d.accepted:
            out["lib_429"] += lib[client] and attempt == 0
            if attempt < 2:
                heapq.heappush(due, (server.t + d.drain_s, client, attempt + 1))
            else:
                out["lib_never"] += lib[client]
            return
        rid = f"r{server.n}"
        server.n += 1
        server.costs[rid], server.generated[rid], server.arrival[rid] = cost, 0, server.t
        server.predicted[rid] = d.predicted_ttft_s
        params = SamplingParams(max_tokens=cost.max_tokens, ignore_eos=True)
        server.sched.add_request(Request(rid, [7] * cost.prompt_tokens, params))
        server.added += 1
        out["lib_first_retry"] += lib[client] and attempt == 1
        if not lib[client]:
            out["plain"].append(rid)

    for client in range(n):
        send(client, 0)
    while due or server.sched.has_unfinished:
        while due and due[0][0] <= server.t:
            _, client, attempt = heapq.heappop(due)
            send(client, attempt)
        if server.sched.has_unfinished:
            server.step()
        elif due:
            server.t = max(server.t, due[0][0])
    met = [server.ttft(r) <= slo for r in out["plain"]]
    return {
        "library_first_retry": out["lib_first_retry"] / max(1, out["lib_429"]),
        "library_never": out["lib_never"],
        "plain_slo": sum(met) / len(met),
        "wall": server.t - t0,
    }


def test_library_clients_keep_getting_in_burst_after_burst():
    adm = AdmissionController(5.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm, true=DEVICE_FIT)
    rng = random.Random(0)
    for size, share in ((2, 0), (2, 1), (8, 0), (8, 1), (24, 0), (24, 1)):  # the fit
        for _ in range(size):
            server.submit(RequestCost(rng.randint(8, 256), 16, ATTEND if share else 0))
        server.run_until_idle()
    bursts = [_burst(server, adm, rng, 150) for _ in range(3)]
    # session 19's code: 0.60 / 0.39 / 0.22; session 20: 0.71 / 0.60 / 0.73 with 15 / 19 /
    # 14 library clients never admitted, mostly prompts whose first token alone misses the
    # SLO (never booked); session 21 (those booked a moment alone, refused retries behind
    # the queue, the pace kept): 0.84 / 0.91 / 0.92, none never admitted
    shares = [b["library_first_retry"] for b in bursts]
    assert sum(shares) / 3 >= 0.82 and min(shares) >= 0.75, bursts
    assert max(b["library_never"] for b in bursts) <= 3, bursts  # session 20: 9-21
    assert min(b["plain_slo"] for b in bursts) >= 0.9, bursts  # 0.91 / 1.00 / 1.00 before
    assert adm.bookings.show_rate >= 0.9
