"""A library build in a child process that shares the server's weights.

Why a process: a build on a thread of the server shares its GIL with the engine thread. On
CUDA the build thread spends its time launching small kernels with the GIL held, and the
engine thread, which needs the GIL between its own launches, starves: a stream decoding
550 tok/s on the tiny model fell to 1-64 tok/s during a build, with gaps up to 1.3 s. A
child process has an interpreter (and a GIL) of its own, so the engine thread never waits
for it; the GPU or the cores are shared, the interpreter is not.

How: the child is started with the 'spawn' context (CUDA cannot run in a forked child;
`use_build_context` puts another in place for a while: the tests fork builds from a forkserver
that has imported torch once, where each spawned child pays seconds of CPU for it) and
receives the model's state dict through torch.multiprocessing, without a copy: CPU tensors
live in shared memory (moved there once, by `SharedModel.of`, when the build worker is made,
before the engine steps: `share_memory_` swaps a storage in place and is unsafe beside a
reader), CUDA tensors travel as CUDA IPC handles, valid while the parent keeps the tensors
alive (they are the engine's weights). The child rebuilds the model around them
(`model.loader.model_from_tensors`), reads the tokenizer from the model directory, builds
and saves the library into the store at a lower priority (on CUDA on a stream of its own)
and reports progress over a pipe; the parent holds the name's reservation throughout and
loads the finished library through the manager.

The child stops at its next prefill piece once the server has gone: it watches the read end
of a pipe whose only write end the server holds (`ParentLink`, as the distributed ranks do),
which turns readable (EOF) however the server ends, under any start method (a forkserver
child's parent is the forkserver, so the parent pid says nothing).

Cancel: a cooperative stop (an event the child checks at every prefill piece), SIGTERM
after `grace_s`, then SIGKILL. A child that dies (killed, out of memory) fails the build
with `BuildProcessError`; the temporary directory it may leave in the store (its owner, the
child, is dead) is removed at once (`remove_stale_tmp_dirs`), and the parent releases the
reservation, which it holds itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import torch

from moska.distributed.rank_processes import (
    ContextFactory,
    ContextSeam,
    ParentLink,
    open_parent_link,
)
from moska.library.errors import LibraryError
from moska.library.prefill import ProgressHook

logger = logging.getLogger(__name__)

BUILD_NICENESS = 10  # builds yield the CPU to the engine thread (Linux)
CANCEL_GRACE_S = 2.0  # a cancelled child stops at its next prefill piece, or is killed
_POLL_S = 0.1  # how often the parent looks at the job's cancel flag


def _spawn() -> BaseContext:
    import torch.multiprocessing as mp  # its reducers share the weights (SharedModel)

    return mp.get_context("spawn")


_BUILDS = ContextSeam(_spawn)


def build_context() -> BaseContext:
    """The multiprocessing context that starts build children (spawn unless a caller put
    another in place with `use_build_context`)."""
    return _BUILDS.get()


def use_build_context(factory: ContextFactory) -> contextlib.AbstractContextManager[None]:
    """Start build children with `factory()`'s context inside the block, then with the one
    before. Not CUDA-safe unless it spawns."""
    return _BUILDS.use(factory)


class BuildCancelledError(Exception):
    """Raised from the prefill hook of a build whose job was cancelled."""


class BuildQuotaError(LibraryError):
    """A build larger than the server allows."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"the documents are {num_tokens} tokens; this server builds libraries of at most "
            f"{max_tokens} tokens over HTTP (max_build_tokens): split them into several "
            "libraries, or build this one offline with `moska library build`"
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class BuildProcessError(RuntimeError):
    """A build that failed in its process. `kind`: the child's exception type name, or
    "BuildProcessDied" when the child ended without an answer (killed, out of memory)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def progress_hook(
    max_tokens: int, report: Callable[[int, int], None], stop: Callable[[], bool]
) -> ProgressHook:
    """The prefill hook of a build, in a thread or a process: reports progress, then stops
    the build (raises) when it is over the quota or `stop()` says so."""

    def on_progress(done: int, total: int) -> None:
        report(done, total)
        if total > max_tokens:
            raise BuildQuotaError(total, max_tokens)
        if stop():
            raise BuildCancelledError()

    return on_progress


@contextlib.contextmanager
def build_stream(device: Any) -> Iterator[None]:
    """On CUDA, run the build on a stream of its own at the lowest priority (0 is CUDA's
    least), so that it does not queue the engine's decode steps behind its prefill."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        yield
        return
    stream = torch.cuda.Stream(device, priority=0)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()  # the library's tensors are complete before anyone reads them


def supports_process_builds(manager: Any) -> bool:
    """Whether `manager` can have its builds run in a process: a real `LibraryManager`
    (`load_built`) over a whole `CausalLM` (not a tensor-parallel slice, not a fake)."""
    from moska.model.llama import CausalLM

    loaded = getattr(manager, "loaded_model", None)
    return (
        callable(getattr(manager, "load_built", None))
        and loaded is not None
        and type(getattr(loaded, "model", None)) is CausalLM
    )


@dataclass(frozen=True)
class SharedModel:
    """What a build process needs of the server's model. Pickling it (torch.multiprocessing's
    reducers) passes the weights by reference: shared memory on CPU, CUDA IPC on CUDA."""

    config: Any  # ModelConfig
    tensors: dict[str, torch.Tensor]  # the model's state dict, the engine's own storage
    path: Path | None  # the model directory: tokenizer and fingerprint
    kernels: str  # the engine's kernel table's name ("triton" / "torch"), rebuilt in the child
    num_threads: int  # torch's intra-op threads, as the server's (the same sums)

    @classmethod
    def of(cls, loaded_model: Any) -> SharedModel:
        """Share `loaded_model`'s weights. Call before the engine steps (see the module)."""
        model = loaded_model.model
        tensors = model.state_dict()
        for t in tensors.values():
            if t.device.type == "cpu":
                t.share_memory_()  # once; a no-op for a storage already shared
        return cls(
            loaded_model.config,
            tensors,
            loaded_model.path,
            model.kernels.name,
            torch.get_num_threads(),
        )

    def rebuild(self) -> Any:
        """In the child: a `LoadedModel` around the shared weights, with its tokenizer."""
        from moska.kernel_ops import kernel_ops
        from moska.model.loader import LoadedModel, model_from_tensors
        from moska.model.tokenizer import Tokenizer

        model = model_from_tensors(self.config, self.tensors)
        model.kernels = kernel_ops(self.kernels)
        tokenizer = None
        if self.path is not None and (Path(self.path) / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_pretrained(
                self.path, extra_eos_token_ids=self.config.eos_token_ids
            )
        return LoadedModel(model, self.config, tokenizer, self.path)


@dataclass(frozen=True)
class BuildSpec:
    """One build, as the child runs it (`manager.build`'s arguments)."""

    name: str
    documents: Sequence[tuple[str, str | Sequence[int]]]
    chunk_size: int | None
    mode: str
    root: Path
    device: str
    max_tokens: int
    prefill_tokens: int | None = None
    kv_dtype: str = "auto"
    routing_rank: int | None = None
    boundary_repair: tuple[int, int] | None = None  # (tokens, layers); None: no repair


def run_build_process(
    shared: SharedModel,
    spec: BuildSpec,
    *,
    on_progress: ProgressHook,
    cancelled: threading.Event,
    on_start: Callable[[int], None] = lambda pid: None,
    grace_s: float = CANCEL_GRACE_S,
) -> Any:
    """Build `spec` in a child process and return its `LibraryInfo`. `on_progress(done,
    total)` sees the child's progress and may raise to stop it; `cancelled` stops it
    (BuildCancelledError). The caller holds the name's reservation. Whatever happens, the
    child has ended and the store holds no temporary directory of it when this returns."""
    import torch.multiprocessing  # noqa: F401 - its reducers share the weights (SharedModel)

    from moska.library.store import remove_stale_tmp_dirs

    ctx = build_context()
    reader, writer = ctx.Pipe(duplex=False)
    server_end, link = open_parent_link(ctx)  # open here while the child may run
    stop = ctx.Event()
    proc = ctx.Process(  # type: ignore[attr-defined]  # every context has Process
        target=_child_main,
        args=(shared, spec, writer, stop, link),
        name=f"moska-build-{spec.name}",
        daemon=True,  # ended with the server
    )
    try:
        proc.start()
        writer.close()  # the child's end only: EOF here once the child has gone
        link.reader.close()  # the child's end only
        assert proc.pid is not None  # started
        on_start(proc.pid)
        return _supervise(proc, reader, cancelled, on_progress)
    finally:
        _stop(proc, stop, grace_s)
        reader.close()
        server_end.close()
        remove_stale_tmp_dirs(spec.root)


def _supervise(
    proc: Any, reader: Connection, cancelled: threading.Event, on_progress: ProgressHook
) -> Any:
    """Relay the child's messages until it answers; raise if it fails, dies or is
    cancelled. Waiting here releases the GIL: the engine thread never waits for it."""
    while True:
        if cancelled.is_set():
            raise BuildCancelledError()
        ready = wait([reader, proc.sentinel], timeout=_POLL_S)
        if not ready:
            continue
        try:
            message = reader.recv() if reader in ready or reader.poll() else None
        except EOFError:
            message = None
        if message is None:  # the child has gone without an answer
            proc.join(timeout=5)
            raise BuildProcessError("BuildProcessDied", _died(proc.exitcode))
        kind = message[0]
        if kind == "progress":
            on_progress(message[1], message[2])
        elif kind == "done":
            return message[1]
        elif kind == "error":
            _, error_type, text, expected = message
            if error_type == BuildCancelledError.__name__:
                raise BuildCancelledError()
            if error_type == SystemExit.__name__:  # SIGTERM from elsewhere
                raise BuildProcessError("BuildProcessDied", _died(-signal.SIGTERM))
            if not expected:
                logger.error("library build process failed: %s: %s", error_type, text)
            raise BuildProcessError(error_type, text)


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        how = f"killed by {signal.Signals(-exitcode).name}"
    elif exitcode:
        how = f"exit code {exitcode}"
    else:
        how = "no answer"
    return (
        f"the library build process ended before the library was saved ({how}; out of "
        "memory?): nothing was written and serving is unaffected; build it again, or "
        "build fewer tokens"
    )


def _stop(proc: Any, stop: Any, grace_s: float) -> None:
    """End the child: a cooperative stop, SIGTERM after `grace_s`, SIGKILL after 1 s more.
    The child's exit is reaped, so its pid no longer counts as a live owner in the store."""
    if proc.pid is None:  # never started
        return
    if proc.is_alive():
        stop.set()
        proc.join(grace_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(1.0)
    if proc.is_alive():
        proc.kill()
    proc.join()


# ---------------------------------------------------------------- in the child


def _child_main(
    shared: SharedModel, spec: BuildSpec, conn: Connection, stop: Any, server: ParentLink
) -> None:
    """The child's entry point: build, save, answer ("done", info) or ("error", type,
    message, expected) on `conn`, exit. It stops at the next prefill piece when `stop` is
    set or the server has gone (`server`'s pipe at EOF)."""
    server.adopt()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, BUILD_NICENESS)  # before torch starts threads
    except (AttributeError, OSError):
        pass
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds: the store's tmp dir is removed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it cancels builds
    try:
        from moska.library.builder import build_and_save

        torch.set_num_threads(shared.num_threads)
        if spec.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(spec.device))
        loaded = shared.rebuild()
        hook = progress_hook(
            spec.max_tokens,
            lambda done, total: conn.send(("progress", done, total)),
            lambda: stop.is_set() or server.parent_gone(),
        )
        kwargs: dict[str, Any] = {"on_progress": hook}
        if spec.prefill_tokens is not None:
            kwargs["prefill_tokens"] = spec.prefill_tokens
        with build_stream(spec.device):
            info, _ = build_and_save(
                loaded,
                spec.documents,
                spec.name,
                spec.root,
                chunk_size=spec.chunk_size,  # None: scales with the library (manager's)
                mode=spec.mode,
                kv_dtype=spec.kv_dtype,
                routing_rank=spec.routing_rank,
                boundary_repair=spec.boundary_repair,
                progress=False,
                **kwargs,
            )
        conn.send(("done", info))
    except BaseException as exc:  # noqa: BLE001 - every failure is answered; the parent decides
        expected = isinstance(exc, LibraryError | BuildCancelledError | SystemExit)
        if not expected:
            traceback.print_exc()  # to the server's stderr
        with contextlib.suppress(OSError):
            conn.send(("error", type(exc).__name__, str(exc), expected))
    finally:
        conn.close()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
