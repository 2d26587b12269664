"""Trace replay: Mooncake rows to prompts (equal hash ids give equal blocks), a synthetic
trace with shared prefixes, and a small replay against the in-process P/D cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import pytest

from moska.bench.trace import load_trace, prompt_of, replay, summarize, synthesize
from moska.bench.trace_client import _one, request_body

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def test_rows_to_prompts_share_blocks(tmp_path):
    rows = synthesize(30, rate_per_s=5.0, num_prefixes=3, prefix_blocks=4, seed=3)
    times = [r["timestamp"] for r in rows]
    assert times == sorted(times) and len({tuple(r["hash_ids"][:4]) for r in rows}) <= 3
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_trace(path) == rows
    a = next(r for r in rows if r["hash_ids"][0] == 0)
    b = next(r for r in rows if r["hash_ids"][0] == 0 and r is not a)
    pa, pb = prompt_of(a, 32), prompt_of(b, 32)
    assert pa[: 4 * 32] == pb[: 4 * 32]  # the shared prefix: equal tokens
    assert pa[4 * 32 : 5 * 32] != pb[4 * 32 : 5 * 32]  # own blocks differ
    assert len(pa) == round(a["input_length"] * 32 / 512)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="hash_ids"):
        load_trace(bad)


def test_replay_small_trace(pd_cluster):
    url, _, _, front = pd_cluster
    rows = synthesize(6, rate_per_s=20.0, num_prefixes=2, prefix_blocks=3, seed=5,
                      output_length=(3, 5))  # fmt: skip
    args = argparse.Namespace(speedup=1.0, block_tokens=16, max_output=5, request_timeout=60)
    cached_before = front.stats.cached_tokens
    results, wall = asyncio.run(replay(url, rows, args))
    report = summarize(results, wall, ttft_slo=60.0, tpot_slo=10.0)
    assert report["completed"] == 6 and report["failed"] == 0, report
    assert report["goodput_rps"] > 0 and report["ttft_p50_s"] <= report["ttft_p99_s"]
    assert all(3 <= r.tokens <= 5 for r in results)
    assert front.stats.cached_tokens > cached_before  # shared prefixes hit the prefill cache


def test_every_token_is_an_event(pd_cluster):
    """The trace client's body asks for logprobs, so a token whose bytes are not yet a
    character (the tiny model's byte tokens) is an event all the same: without it the
    server held the text back and the first event came steps after the first token."""
    url = pd_cluster[0]

    async def one():
        async with httpx.AsyncClient(timeout=60) as client:
            body = request_body(list(range(40, 90)), 24)
            return await _one(client, url, body, time.monotonic())

    r = asyncio.run(one())
    assert r.status == 200 and r.tokens == 24
    assert r.events == r.tokens
