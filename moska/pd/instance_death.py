"""Awaiting an instance that may die: the front end's calls to an instance end at once when
its health watch marks it dead, rather than waiting out the HTTP timeout (a dead decode
instance's streams then end with an error in the client's stream)."""

from __future__ import annotations

import asyncio


class InstanceDied(Exception):
    """The instance a request was waiting on was taken out (process gone, health failed)."""


async def or_dead(aw, dead: asyncio.Event):
    """Await `aw`, or raise InstanceDied as soon as `dead` is set."""
    task = asyncio.ensure_future(aw)
    if dead.is_set():
        task.cancel()
        raise InstanceDied("the instance died")
    waiter = asyncio.ensure_future(dead.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise InstanceDied("the instance died")
