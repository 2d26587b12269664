"""Layer-by-layer KV capture during a prefill step, so that the transfer of a layer's KV
overlaps the prefill of the layers after it (Mooncake's layer-wise transfer).

`LayerCapture.install(engine, on_step)` wraps the engine runner's `launch` and puts a
forward hook on every attention module that owns a KV slot. Before a step runs, `on_step`
sees its scheduled requests and returns a `LayerStream` for each one whose whole prompt is
computed by this step (the prefill instance: the tagged requests). After attention layer
i wrote slot s for the step, the hook reads slot s of those requests' usable prompt blocks
into the stream; the sender thread (`transport.KVTransport`) sends it while the model goes
on with layer i + 1. Blocks of the prompt computed in earlier steps or found in the prefix
cache are in the cache already and go out with the same read.

On a GPU the read is queued on a side stream after the layer's kernels (an event on the
compute stream) into pinned host memory, and the sender waits only for that copy: the
engine thread never synchronizes. A stream whose transfer goes device to device (CUDA
IPC, `ring.py`: `want_host` False) keeps the read on the GPU instead. On CPU the read is a plain copy on the engine thread.
A step replayed from a CUDA graph runs no hook: one-token steps are replayed, and a
re-prefill of a prompt whose blocks are all cached is one. The layers no hook read are read
after such a step (`_read_missing`), so its stream completes all the same.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moska.pd import kv_blocks


class LayerStream:
    """The per-layer KV (`[2, n, bs, Hkv, D]`, on the host unless `want_host` is off) of one
    transfer, filled as the layers are computed; `layer(i, timeout)` blocks until layer i
    is there. `device`: where the engine computes it."""

    def __init__(
        self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.num_layers = num_layers
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.want_host = True  # the transport turns it off for a device-to-device channel
        self._layers: list[tuple[torch.Tensor, object] | None] = [None] * num_layers
        self._error: str | None = None
        self.completed_at: float | None = None  # when the last layer was put
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self.num_layers

    def put(self, i: int, kv: torch.Tensor, ready: object = None) -> None:
        """Layer i's KV; `ready` (a CUDA event) is synchronized before it is read."""
        with self._cond:
            self._layers[i] = (kv, ready)
            if all(x is not None for x in self._layers):
                self.completed_at = time.monotonic()
            self._cond.notify_all()

    def fail(self, error: str) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def layer(self, i: int, timeout_s: float) -> torch.Tensor:
        with self._cond:
            self._cond.wait_for(
                lambda: self._layers[i] is not None or self._error is not None, timeout_s
            )
            got = self._layers[i]
            if got is None:
                raise TimeoutError(self._error or f"layer {i} was not computed in {timeout_s} s")
        kv, ready = got
        if ready is not None:
            ready.synchronize()  # type: ignore[attr-defined]  # a torch.cuda.Event
        return kv

    def missing(self) -> list[int]:
        """The layers not put yet."""
        with self._cond:
            return [i for i, x in enumerate(self._layers) if x is None]

    def complete(self) -> bool:
        with self._cond:
            return all(x is not None for x in self._layers)


@dataclass
class _Capture:
    stream: LayerStream
    ids: torch.Tensor  # the blocks to read, on the cache's device


@dataclass
class LayerCapture:
    """The hooks of one engine (see the module doc); `remove` takes them off."""

    engine: Any  # an LLMEngine (duck-typed: the runner, its cache and block manager)
    on_step: Callable[[list], list[tuple[Any, LayerStream]]]
    _active: list[_Capture] = field(default_factory=list)
    _handles: list = field(default_factory=list)
    _launch: Callable | None = None
    _side: object = None  # the CUDA side stream of the reads

    @classmethod
    def install(cls, engine, on_step) -> LayerCapture:
        cap = cls(engine, on_step)
        runner = engine.runner
        cap._launch = runner.launch
        runner.launch = cap._wrapped_launch
        for layer in runner.model.decoder_layers:
            attn = layer.self_attn
            if attn.owns_kv:
                cap._handles.append(attn.register_forward_hook(cap._hook_for(attn.kv_slot)))
        if runner.cache.k.is_cuda:
            cap._side = torch.cuda.Stream(device=runner.cache.k.device)
        return cap

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.engine.runner.launch = self._launch

    def _wrapped_launch(self, scheduled, block_table, *args, **kwargs):
        assert self._launch is not None
        cache = self.engine.runner.cache
        self._active = [
            _Capture(stream, torch.tensor(ids, dtype=torch.long, device=cache.k.device))
            for ids, stream in self._streams(scheduled, block_table)
        ]
        ran = False
        try:
            step = self._launch(scheduled, block_table, *args, **kwargs)
            ran = True
            return step
        finally:
            if ran:
                self._read_missing()
            if self._active and isinstance(self._side, torch.cuda.Stream):
                # later kernels (a next step reusing these blocks) wait for the reads; the
                # host does not
                torch.cuda.current_stream(cache.k.device).wait_stream(self._side)
            for c in self._active:
                if not c.stream.complete():  # the step raised (or was replayed): no KV
                    c.stream.fail("the prefill step ended before its KV was read")
            self._active = []

    def _read_missing(self) -> None:
        """Read the layers whose hook did not run although the step did: a step replayed
        from a CUDA graph calls no module hook, and a one-token step that completes a prompt
        whose blocks were all cached (a re-prefill of the same prompt) is one. The usable
        blocks never hold the step's own tokens then, and on a GPU the read is queued
        behind the step, so the KV read now is what the hooks would have read."""
        for c in self._active:
            for slot in c.stream.missing():
                self._put(c, slot)

    def _put(self, c: _Capture, slot: int) -> None:
        """Read slot `slot` of the capture's blocks into its stream."""
        cache = self.engine.runner.cache
        if self._side is None:
            kv = torch.stack(
                [cache.k[slot].index_select(0, c.ids), cache.v[slot].index_select(0, c.ids)]
            )
            c.stream.put(slot, kv)
        else:
            c.stream.put(slot, *self._read_cuda(cache, slot, c.ids, c.stream.want_host))

    def _streams(self, scheduled, block_table) -> list[tuple[list[int], LayerStream]]:
        bs = self.engine.block_manager.block_size
        out = []
        for req, stream in self.on_step(scheduled):
            n = kv_blocks.usable_blocks(len(req.prompt_token_ids), bs)
            out.append((block_table(req.request_id)[:n], stream))
        return out

    def _hook_for(self, slot: int):
        def hook(_module, _inputs, _output) -> None:
            for c in self._active:
                self._put(c, slot)

        return hook

    def _read_cuda(self, cache, slot: int, ids: torch.Tensor, want_host: bool = True):
        side = self._side
        assert isinstance(side, torch.cuda.Stream)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            kv = torch.stack(
                [cache.k[slot].index_select(0, ids), cache.v[slot].index_select(0, ids)]
            )
            out = kv  # (allocated on the side stream; its reader synchronizes `ready`)
            if want_host:
                out = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
                out.copy_(kv, non_blocking=True)
                kv.record_stream(side)
            ready = torch.cuda.Event()
            ready.record(side)
        return out, ready


def stream_for(engine, request) -> tuple[dict, LayerStream]:
    """(meta, an empty stream) for a request whose prompt the coming step completes: the
    header `kv_blocks.snapshot` would give after it finished."""
    bm, cache = engine.block_manager, engine.runner.cache
    n = kv_blocks.usable_blocks(len(request.prompt_token_ids), bm.block_size)
    shape = (2, n, *cache.k.shape[2:])
    stream = LayerStream(int(cache.k.shape[0]), shape, cache.k.dtype, cache.k.device)
    return kv_blocks.header(request, n, bm.block_size), stream
