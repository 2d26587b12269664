"""DeathWatch: the relay's per-stream death watch (one waiter for all of a stream's chunks)."""

import asyncio

import pytest

from moska.pd.instance_death import DeathWatch, InstanceDied


async def _chunks(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def test_a_stream_passes_through_with_one_waiter():
    async def run():
        dead = asyncio.Event()
        waits = 0
        real = dead.wait

        async def counted():
            nonlocal waits
            waits += 1
            return await real()

        dead.wait = counted  # type: ignore[method-assign]
        watch, it, got = DeathWatch(dead), _chunks(50).__aiter__(), []
        while True:
            try:
                got.append(await watch.wait(it.__anext__()))
            except StopAsyncIteration:
                break
        watch.close()
        await asyncio.sleep(0)
        return got, waits, watch._waiter

    got, waits, waiter = asyncio.run(run())
    assert got == list(range(50))
    assert waits == 1  # or_dead made (and cancelled) one waiter per chunk
    assert waiter is None


def test_death_during_a_pending_read_ends_it_at_once():
    async def run():
        dead, never = asyncio.Event(), asyncio.Event()
        watch = DeathWatch(dead)
        read = asyncio.ensure_future(never.wait())  # a chunk that never comes
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, dead.set)
        t0 = loop.time()
        with pytest.raises(InstanceDied):
            await asyncio.wait_for(watch.wait(read), timeout=5)
        took = loop.time() - t0
        await asyncio.sleep(0)
        watch.close()
        return took, read.cancelled()

    took, cancelled = asyncio.run(run())
    assert took < 1.0 and cancelled


def test_an_instance_already_dead_raises_before_awaiting():
    async def run():
        dead = asyncio.Event()
        dead.set()
        watch = DeathWatch(dead)
        read = asyncio.ensure_future(asyncio.sleep(10))
        with pytest.raises(InstanceDied):
            await watch.wait(read)
        await asyncio.sleep(0)
        return read.cancelled(), watch._waiter

    cancelled, waiter = asyncio.run(run())
    assert cancelled and waiter is None
