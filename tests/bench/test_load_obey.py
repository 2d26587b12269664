"""`moska bench load --obey-retries N` (load_obey): clients that retry their 429s after each
promise, like the OpenAI SDK. The summary's arithmetic on hand-made records; the retry loop
against a raw asyncio server that books each refusal (fast); a tiny burst against the real
server with a small SLO."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from moska.bench.load_obey import (
    EPS_S,
    Sampler,
    check_obey,
    obey,
    obey_table,
    overall,
    summarize_obey,
)
from moska.bench.load_probe import PROBE_HEADER

pytestmark = pytest.mark.timeout(120)


def _att(t: float, status: int, ms: str | None = None, ttft: float | None = None) -> dict:
    return {
        "t_start": t,
        "t_status": t + 0.05,
        "status": status,
        "retry_after_ms": ms,
        "ttft": ttft,
        "completed": status == 200,
        "error": None,
        "hung": False,
        "at_door": False if status == 429 else None,
        "admitted": status == 200,
    }


def _client(*attempts: dict, samples: tuple[str | None, ...] = ()) -> dict:
    first = attempts[0]
    rows = [{"verdict": v} for v in samples]
    return first | {"library": False, "attempts": list(attempts), "obey_samples": rows}


def _records() -> list[dict]:
    slo_ok, slo_miss = 0.5, 2.0
    return [
        _client(_att(0.0, 200, ttft=slo_ok)),  # admitted at once, in the SLO
        _client(_att(0.0, 200, ttft=slo_miss)),  # admitted at once, late
        # 429, admitted on its first retry (sent 0.5 s after the 429's status), in the SLO
        _client(_att(0.0, 429, "500"), _att(0.55, 200, ttft=slo_ok), samples=("within",)),
        # 429, 429, admitted on the second retry, late
        _client(_att(0.0, 429, "500"), _att(0.6, 429, "1000"), _att(1.7, 200, ttft=slo_miss)),
        # never admitted: three 429s (N = 2)
        _client(
            _att(0.0, 429, "500"),
            _att(0.6, 429, "300"),
            _att(1.0, 429, "300"),
            samples=("short", "long"),
        ),
    ]


def test_summary_arithmetic_on_hand_made_records():
    o = summarize_obey(_records(), 1.0, 2)
    check_obey(o)
    assert o["clients"] == 5 and o["clients_429"] == 3
    assert o["admitted_first_attempt"] == 2 and o["admitted_on_retry"] == 2
    assert o["admitted_first_retry"] == 1 and o["never_admitted"] == 1 and o["exhausted"] == 1
    assert o["admitted_first_retry_share"] == pytest.approx(1 / 3)
    assert o["admitted_within_n_share"] == pytest.approx(2 / 3)
    assert o["retry_admitted_slo_share"] == 0.5  # one of the two admitted after a retry
    assert o["slo_share_all_admitted"] == 0.5  # 2 of 4 admitted (first attempts and retries)
    assert o["retries_sent"] == 5 and o["retry_429"] == 3
    assert o["early_retries"] == 0 and o["failed_or_hung_attempts"] == 0
    assert o["over_sdk_limit"] == 0
    # a promise over the SDK's 120 s: counted per client (that client would not retry)
    far = _client(_att(0.0, 429, "130000"), _att(130.1, 429, "121000"), _att(251.2, 200))
    assert summarize_obey([far], 1.0, 2)["over_sdk_limit"] == 1
    assert o["sampled"] == 3 and o["sampled_within_share"] == pytest.approx(1 / 3)
    assert o["sampled_short"] == o["sampled_long"] == 1 and o["sampled_flicker"] == 0
    assert [len(a) for a in o["attempts_429_clients"]["plain"]] == [2, 3, 3]
    assert o["attempts_429_clients"]["library"] == []
    assert o["by_kind"]["plain"]["clients"] == 5 and o["by_kind"]["library"]["clients"] == 0
    # the bursts together: counts summed, shares recomputed (not averaged)
    both = overall([o, summarize_obey(_records()[:1], 1.0, 2)])
    assert both["clients"] == 6 and both["admitted_all"] == 5
    assert both["slo_share_all_admitted"] == pytest.approx(3 / 5)
    assert both["admitted_within_n_share"] == pytest.approx(2 / 3)
    assert both["by_kind"]["plain"]["admitted_all"] == 5
    text = obey_table({"bursts": [{"clients": 5, "obey": o}], "obey_overall": both})
    assert "| 5 | 3 |" in text and "| all | 3 |" in text and "| all library | 0 |" in text


def test_the_check_catches_an_early_retry_and_a_lost_request():
    early = _client(_att(0.0, 429, "500"), _att(0.3, 200, ttft=0.1))  # 0.25 s after its 429
    o = summarize_obey([early], 1.0, 2)
    assert o["early_retries"] == 1
    with pytest.raises(AssertionError):
        check_obey(o)
    # a retry that failed: not admitted, not a 429 either
    failed = _att(0.6, 500) | {"error": "500: boom"}
    o = summarize_obey([_client(_att(0.0, 429, "500"), failed)], 1.0, 2)
    assert o["failed_or_hung_attempts"] == 1 and o["never_admitted"] == 1
    with pytest.raises(AssertionError):
        check_obey(o)


async def _booking_server(promise_ms: int, seen: list[tuple[float, bool, bytes]]):
    """Refuses each body's first request with `promise_ms` and books it; a real request of
    that body before the booking is refused with the time left, one at or after it gets a
    one-token stream. A dry one is refused (with the time left, at least 1 ms) until that
    body's real retry has come, then gets a dry 429 (Retry-After 0): by order, not by the
    clock, so that a loaded machine sending the half late (it is due 150 ms before the
    booking) does not turn it into an admission."""
    due: dict[bytes, float] = {}
    retried: set[bytes] = set()  # bodies whose real retry came

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r")[0]))
        dry = f"{PROBE_HEADER}: 1".encode() in head
        now = time.perf_counter()
        seen.append((now, dry, body))
        if body not in due:
            due[body] = now + promise_ms / 1e3
        elif not dry:
            retried.add(body)
        left = due[body] - now
        if left > 0 or (dry and body not in retried):
            ms = max(1, math.ceil(left * 1e3))
            writer.write(
                f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nretry-after-ms: {ms}\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
            )
        elif dry:
            writer.write(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
        else:
            chunk = b'{"choices": [{"text": "x", "finish_reason": "length"}]}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            writer.write(b"data: " + chunk + b"\n\ndata: [DONE]\n\n")
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_obey_retries_at_the_promise_and_sends_the_sampled_dry_half_before_it():
    from moska.bench.load_client import one

    promise_ms = 300
    seen: list[tuple[float, bool, bytes]] = []

    async def main() -> list[dict]:
        server = await _booking_server(promise_ms, seen)
        addr = ("127.0.0.1", server.sockets[0].getsockname()[1])
        t0 = time.perf_counter()
        sample = Sampler(2)  # every 2nd 429

        async def client(i: int) -> dict:
            body = {"prompt": f"p{i}", "logprobs": 0}
            first = await one(addr, "", body, t0, 10)
            real = lambda: one(addr, "", body, t0, 10)
            dry = lambda: one(addr, "", body, t0, 10, probe=True)
            return await obey(first, 2, t0, real, dry, sample)

        async with server:
            return await asyncio.gather(*(client(i) for i in range(4)))

    recs = asyncio.run(main())
    o = summarize_obey(recs, 1.0, 2)
    check_obey(o)
    assert o["clients_429"] == 4 and o["admitted_first_retry"] == 4, o
    assert o["sampled"] == 2 and o["sampled_within"] == 2, o  # dry half refused, real at P in
    for r in recs:
        first, retry = r["attempts"]
        assert retry["t_start"] >= first["t_status"] + promise_ms / 1e3 - EPS_S
        for s in r["obey_samples"]:
            assert promise_ms / 2e3 - EPS_S <= s["half"][0] < s["at"][0] and s["half"][1] is False
    # real retries went without the probe header, dry halves with it: 4 + 4 + 2 requests
    assert sum(1 for _, dry, _ in seen if dry) == 2 and len(seen) == 10


def test_a_tiny_burst_against_the_real_server_with_obeying_clients():
    """The tiny model, 8 sequences and a 256-token step budget, a 0.5 s SLO: a burst of 24
    gets 429s; each client retries twice at most, after each promise."""
    from moska.bench.load import check, run_bursts, table
    from moska.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(
        None,
        device="cpu",
        max_model_len=512,
        num_kv_blocks=512,
        max_num_batched_tokens=256,
        max_num_seqs=8,
    )
    report = run_bursts(
        [24],
        ttft_slo=0.5,
        max_tokens=4,
        library=None,
        engine=engine,
        warmup=(2,),
        timeout_s=60,
        probe_interval_s=0.1,
        client_process=False,
        obey_retries=2,
    )
    check(report)  # with check_obey: every client admitted (and completed) or never
    (fig,) = report["bursts"]
    o = fig["obey"]
    assert fig["rejected_429"] == o["clients_429"] > 0, o
    assert fig["admitted"] == o["admitted_first_attempt"]
    assert o["admitted_first_attempt"] + o["admitted_on_retry"] + o["never_admitted"] == 24
    assert o["retries_sent"] >= o["clients_429"] and o["retries"] == 2
    # the first-attempt figures keep their meaning; no three-point dry retries in this mode
    assert fig["own_retry"]["all"]["n"] == 0
    assert o["by_kind"]["plain"]["clients"] == 24
    for attempts in o["attempts_429_clients"]["plain"]:
        assert 2 <= len(attempts) <= 3
        assert all(not a[4] for a in attempts[:-1])  # nothing after an admitted attempt
        for prev, nxt in itertools.pairwise(attempts):
            assert prev[2] == 429 and nxt[0] >= prev[1] + int(prev[3]) / 1e3 - EPS_S
        if not attempts[-1][4]:
            assert len(attempts) == 3  # never admitted: every retry used
    for s in o["samples"]:
        assert s["half"][0] >= s["promised_s"] / 2 - EPS_S
        assert s["at"][0] >= s["promised_s"] - EPS_S
    assert report["obey_overall"]["clients"] == 24
    assert "| 24 |" in table(report)
