"""How rank 0 starts the processes of its other ranks, and how they know it is still there.

The start method is a seam: spawn by default (a fresh interpreter: the only CUDA-safe way,
since a forked CUDA context is unusable), and a caller may put another in place for a while
(`use_process_context`). The tests do: they fork ranks from a forkserver that has imported
torch and the engine once (each spawned rank pays seconds of CPU for its imports).

A rank must leave when rank 0 is gone (nobody will send STOP). It cannot ask who its parent
is: a forkserver child's parent is the forkserver, and a dead parent's children are
re-parented. So rank 0 holds the only write end of a pipe and never writes to it; each rank
holds a read end (`ParentLink`). However rank 0 ends (SIGKILL included) the kernel closes its
end, and the ranks' read end turns readable (EOF) under any start method.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext

ContextFactory = Callable[[], BaseContext]


class ContextSeam:
    """Which multiprocessing context starts a kind of child process: `default()` unless a
    caller put another factory in place with `use` (called at each start, so it may start a
    server lazily). Users keep the default; tests put a preloaded forkserver there."""

    def __init__(self, default: ContextFactory) -> None:
        self._factory = default

    def get(self) -> BaseContext:
        return self._factory()

    @contextlib.contextmanager
    def use(self, factory: ContextFactory) -> Iterator[None]:
        """`factory()`'s context inside the block, then the one before."""
        saved, self._factory = self._factory, factory
        try:
            yield
        finally:
            self._factory = saved


def _spawn() -> BaseContext:
    return multiprocessing.get_context("spawn")


_RANKS = ContextSeam(_spawn)


def process_context() -> BaseContext:
    """The multiprocessing context that starts rank 0's other ranks (spawn unless a caller
    put another in place with `use_process_context`)."""
    return _RANKS.get()


def use_process_context(factory: ContextFactory) -> contextlib.AbstractContextManager[None]:
    """Start ranks with `factory()`'s context inside the block, then with the one before."""
    return _RANKS.use(factory)


class ParentLink:
    """A rank's end of the pipe rank 0 holds open while it lives (see the module docstring).

    Picklable while a process is being started (the read end travels as a file descriptor,
    the write end stays behind). Under fork nothing is pickled and the child inherits rank
    0's write end too: `adopt()` closes that copy, which would otherwise keep the pipe open
    for as long as the rank itself lives."""

    def __init__(self, reader: Connection, inherited_writer: Connection | None) -> None:
        self.reader = reader
        self.inherited_writer = inherited_writer

    def adopt(self) -> None:
        """In the rank, before it watches: drop a write end inherited by fork."""
        if self.inherited_writer is not None:
            self.inherited_writer.close()
            self.inherited_writer = None

    def parent_gone(self) -> bool:
        """True once rank 0's end is closed (rank 0 exited or shut down); never blocks."""
        try:
            return self.reader.poll()  # nothing is ever written: readable means EOF
        except (OSError, EOFError, ValueError):  # ValueError: this end is already closed
            return True

    def __getstate__(self) -> dict:
        # started by spawn or forkserver: the write end stays with rank 0 (pickling it would
        # hand the rank a copy); under fork the object is inherited, not pickled
        return {"reader": self.reader, "inherited_writer": None}


def open_parent_link(ctx: BaseContext) -> tuple[Connection, ParentLink]:
    """(rank 0's write end, the link to hand each rank it starts with `ctx`). Rank 0 keeps
    the write end open while its ranks run and closes it after they stop; once the ranks are
    started it may close its copy of the read end (`link.reader.close()`)."""
    reader, writer = ctx.Pipe(duplex=False)
    return writer, ParentLink(reader, writer)  # pickling drops the writer (__getstate__)
