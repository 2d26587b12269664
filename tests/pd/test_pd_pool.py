"""The shared host KV pool: a prompt one instance computed is taken from the pool by
another (it computes only the tail), with the same output; a block whose checksum fails
is removed and recomputed, never used."""

from __future__ import annotations

import contextlib

import httpx
import pytest
import torch
from conftest import make_engine

from moska.pd.index import block_hashes
from moska.pd.kv_pool import KVPool
from moska.server.background import background_server

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def test_pool_roundtrip_and_checksum(tmp_path):
    pool = KVPool(tmp_path, capacity_blocks=2)
    kv = torch.randn(3, 2, 4, 1, 8)
    pool.put(1, kv)
    assert torch.equal(pool.get(1, kv.shape, kv.dtype), kv)
    assert pool.get(1, (3, 2, 4, 1, 9), kv.dtype) is None  # another layout: dropped
    assert pool.corrupt == 1 and 1 not in pool
    pool.put(2, kv)
    path = pool._path(2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert pool.get(2, kv.shape, kv.dtype) is None and not path.exists() and pool.corrupt == 2
    pool.put(3, kv), pool.put(4, kv)
    assert len(list(tmp_path.glob("*.kv"))) == 2  # capacity


def test_disk_tier_keeps_what_host_memory_lets_go(tmp_path):
    pool = KVPool(tmp_path / "shm", capacity_blocks=2, disk_root=tmp_path / "disk")
    blocks = {h: torch.randn(3, 2, 4, 1, 8) for h in range(1, 5)}
    for h, kv in blocks.items():
        pool.put(h, kv)
    on_disk = {p.name for p in (tmp_path / "disk").glob("*.kv")}
    assert len(list((tmp_path / "shm").glob("*.kv"))) == 2 and len(on_disk) == 2
    assert all(h in pool for h in blocks)  # nothing lost: two in memory, two on disk
    oldest = next(h for h in blocks if pool._path(h).name in on_disk)
    kv = blocks[oldest]
    assert torch.equal(pool.get(oldest, kv.shape, kv.dtype), kv)  # from disk, checked
    assert pool._path(oldest).exists()  # moved back to host memory
    victim = next(p for p in (tmp_path / "disk").glob("*.kv"))  # a bad block on disk
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    h = int(victim.stem, 16)
    assert pool.get(h, kv.shape, kv.dtype) is None and not victim.exists()
    assert pool.disk is not None and pool.disk.corrupt == 1 and h not in pool


def test_instances_share_prefixes_through_the_pool(pd_cluster, tmp_path):
    from moska.pd.instance import PDConfig, attach
    from moska.server.app import create_app
    from moska.server.settings import ServerSettings

    first = pd_cluster[2]["prefill0"].state.moska.engine
    apps = []
    for _ in range(2):
        app = create_app(make_engine(first), ServerSettings(ttft_slo=None))
        attach(app, PDConfig("both", kv_pool_dir=str(tmp_path / "pool")))
        apps.append(app)
    with contextlib.ExitStack() as stack:
        a, b = (stack.enter_context(background_server(app)) for app in apps)
        engines = [app.state.moska.engine for app in apps]

        def run(url, ids, engine):
            before = engine.stats().prompt_tokens_computed
            r = httpx.post(f"{url}/v1/completions", json={"model": "moska-tiny", "prompt": ids,
                           "max_tokens": 6, "temperature": 0, "ignore_eos": True}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], engine.stats().prompt_tokens_computed - before

        ids = list(range(20, 90))  # 70 tokens: 4 usable blocks of 16
        text_a, computed_a = run(a, ids, engines[0])
        text_b, computed_b = run(b, ids, engines[1])
        assert computed_a == 70 and computed_b == 70 - 64 and text_a == text_b
        # a damaged block: taken up to it, recomputed from it, the same output
        ids2 = list(range(100, 170))
        text_a2, _ = run(a, ids2, engines[0])
        pool = apps[1].state.pd.pool
        path = pool._path(block_hashes(ids2, 16, (None, None))[1])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
        text_b2, computed_b2 = run(b, ids2, engines[1])
        assert computed_b2 == 70 - 16 and text_b2 == text_a2 and pool.corrupt == 1
