"""Triton kernel compiles, counted (`count`): an engine step that compiled one paid a
one-off, as a step that captured a CUDA graph does.

Why: a Triton kernel is compiled (or loaded from Triton's disk cache) on its first launch
with each new specialization: its constexprs and its integer arguments' divisibility by 16
or equality to 1. That happens on the host inside the step that first meets the shape, and
a fresh GPU server meets new shapes in its first bursts (decode steps that mix plain and
library rows, batch sizes the warm-up never ran). `LLMEngine.last_step_compiled` tells the
server so, and admission does not learn its step time from such a step (its slowdown
factor and step-time fit), as for a graph capture.

The count comes from Triton's JIT cache hook (`triton.knobs.runtime.jit_cache_hook`; on a
Triton before knobs, `JITFunction.cache_hook`), called on every miss of a kernel's
in-memory cache, before it compiles. `install` chains to a hook already set, and returns
its verdict. The interpreter (`TRITON_INTERPRET=1`) compiles nothing and calls no hook.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_count = 0
_installed = False


def count() -> int:
    """How many kernel cache misses (compiles) the hook has seen since `install`."""
    return _count


def _chained(previous: Callable[..., Any] | None) -> Callable[..., Any]:
    def hook(*args: Any, **kwargs: Any) -> Any:
        global _count
        with _lock:
            _count += 1
        return previous(*args, **kwargs) if previous is not None else False

    return hook


def install() -> bool:
    """Count Triton's compiles from now on (idempotent); False when Triton is absent."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            import triton
        except ImportError:
            return False
        knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
        if knobs is not None and hasattr(knobs, "jit_cache_hook"):
            knobs.jit_cache_hook = _chained(knobs.jit_cache_hook)
        else:  # Triton before its knobs module
            from triton.runtime.jit import JITFunction

            JITFunction.cache_hook = _chained(getattr(JITFunction, "cache_hook", None))
        _installed = True
        return True
