"""A moska server in a prefill or decode role (`moska serve --role prefill|decode`).

The instance keeps the whole ordinary server (OpenAI routes, admission, libraries) and adds:

- prefill: a request sent with the header `x-moska-pd-transfer: TID:RANK` (the front end
  sends the client's body with max_tokens 1) has its prompt's full KV blocks sent to decode
  rank RANK layer by layer, each layer as soon as the step that completes the prompt has
  computed it (`stream.LayerCapture`: the transfer overlaps the rest of the prefill); with
  `overlap=False` (`--no-pd-overlap`), all layers when the request finishes
  (`kv_blocks.snapshot`, on the engine thread, before any later step can reuse the
  blocks). `GET /pd/transfer/TID` answers once the send ended (delivered, or failed after
  one retry); its `seconds` are those the transfer took after the prefill ended.
- decode: `POST /pd/accept/TID` waits for transfer TID and writes its blocks into the
  prefix cache (`kv_blocks.inject`), held until `POST /pd/release/TID` (or `hold_s`); the
  front end then sends the client's own request, which finds the prompt cached.
- both: `GET /pd/info`: role, rank, KV capacity and load, for the front end's scheduler.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from moska.pd import kv_blocks
from moska.pd.endpoint import TransferEndpoint
from moska.pd.errors import TransferFailedError
from moska.pd.index import block_hashes
from moska.pd.kv_pool import KVPool
from moska.pd.stream import LayerCapture, LayerStream, stream_for
from moska.pd.transport import KVTransport

logger = logging.getLogger(__name__)

TRANSFER_HEADER = b"x-moska-pd-transfer"
PD_TRANSFER: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "moska_pd_transfer", default=None
)
ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class PDConfig:
    """An instance's role and its place in the transfer group (None for `both`)."""

    role: str = "both"
    endpoint: TransferEndpoint | None = None
    kv_pool_dir: str | None = None  # a host KV pool shared by this host's instances
    kv_pool_blocks: int = 4096
    hold_s: float = 30.0  # injected blocks are held at most this long
    # prefill: send each layer's KV as soon as the prefill step computed it (overlapping
    # the next layers); False: the whole prompt's KV after the request finished
    overlap: bool = True
    kv_pool_disk_dir: str | None = None  # the pool's disk tier (`kv_pool.py`)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role != "both" and self.endpoint is None:
            raise ValueError(
                f"--role {self.role} needs --pd-master, --pd-rank and --pd-world (or start "
                "the cluster with `moska router --pd P:D`)"
            )


class _TransferMiddleware:
    """Reads the transfer header into PD_TRANSFER for the request's task."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for key, value in scope.get("headers", ()):
                if key == TRANSFER_HEADER:
                    tid, _, rank = value.decode().partition(":")
                    if tid.isdigit() and rank.isdigit():
                        token = PD_TRANSFER.set((int(tid), int(rank)))
                        try:
                            await self.app(scope, receive, send)
                        finally:
                            PD_TRANSFER.reset(token)
                        return
        await self.app(scope, receive, send)


class PDInstance:
    """The role's state on one server; `attach` wires it into the app."""

    def __init__(self, config: PDConfig, state: Any) -> None:
        self.config = config
        self.state = state
        self.engine = state.engine
        self.transport = KVTransport(config.endpoint) if config.endpoint else None
        self.ready = threading.Event()
        self.connect_error: str | None = None
        self._jobs: dict[str, tuple[int, int]] = {}  # engine request id -> (tid, dst)
        self._streamed: set[str] = set()  # jobs sent layer by layer (engine thread only)
        self.capture: LayerCapture | None = None
        self._results: dict[int, dict] = {}  # tid -> send result
        self._cond = threading.Condition()
        self._holds: dict[int, tuple[kv_blocks.Holder, float]] = {}  # engine thread only
        self.pool = (
            KVPool(config.kv_pool_dir, config.kv_pool_blocks, config.kv_pool_disk_dir)
            if config.kv_pool_dir
            else None
        )
        self._pool_holds: dict[str, kv_blocks.Holder] = {}  # engine thread only

    @property
    def _kv_pool(self) -> KVPool:
        """The shared KV pool; only called on the paths `attach` wires when one is set."""
        assert self.pool is not None, "no --kv-pool-dir: this instance has no KV pool"
        return self.pool

    @property
    def _transport(self) -> KVTransport:
        """The transfer group; P/D roles (those that send or accept transfers) have one."""
        assert self.transport is not None, "no transfer endpoint: not a P/D instance"
        return self.transport

    # ---- startup ---------------------------------------------------------------------
    def connect(self) -> None:
        """Join the transfer group (blocks until every rank joined), then start the
        receivers (decode)."""
        try:
            if self.transport is not None:
                self.transport.connect()
                if self.config.role == "decode":  # from every other rank (prefills send)
                    self.transport.recv_device = self.engine.runner.cache.k.device
                    me = self.transport.rank
                    self.transport.start_receiving(
                        [r for r in range(self.transport.world_size) if r != me]
                    )
        except Exception as exc:  # noqa: BLE001 - reported by /pd/info and the log
            self.connect_error = str(exc)
            logger.error("joining the KV transfer group failed: %s", exc)
            return
        self.ready.set()

    def info(self) -> dict:
        bm = self.engine.block_manager
        load = self.state.async_engine.load()
        ep = self.config.endpoint
        return {
            "role": self.config.role,
            "rank": ep.rank if ep else None,
            "ready": self.ready.is_set() or self.transport is None,
            "error": self.connect_error,
            "block_size": bm.block_size,
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "max_num_seqs": self.engine.config.max_num_seqs,
            "max_batched_tokens": int(self.engine.config.max_num_batched_tokens or 0),
            # the admission controller's fit of this engine's step times (step_model.py)
            "step_coef": [float(c) for c in self.state.admission.model.coef],
            "num_running": load.num_running,
            "num_waiting": load.num_waiting,
            "max_model_len": int(self.engine.max_model_len),
            "model": self.state.model_name,
        }

    # ---- prefill ---------------------------------------------------------------------
    def wrap_engine(self) -> None:
        """Prefill: send a tagged request's KV when it finishes. With a KV pool: take a
        prompt's leading blocks from the pool before it runs, and put its blocks there
        when it finishes."""
        aengine, bm = self.state.async_engine, self.engine.block_manager
        add, free = aengine.add_requests, bm.free

        async def add_requests(request_ids, prompt, *args, **kwargs):
            tag = PD_TRANSFER.get()
            if tag is not None:
                for rid in request_ids:
                    self._jobs[rid] = tag
            if self.pool is not None and isinstance(prompt, list) and not kwargs.get("library"):
                top_k, rid = kwargs.get("top_k_chunks"), request_ids[0]
                await aengine.call(lambda: self._from_pool(rid, prompt, top_k))
            return await add(request_ids, prompt, *args, **kwargs)

        def free_and_send(request) -> None:
            status = getattr(request, "status", None)
            if status is not None and status.finished:
                job = self._jobs.pop(request.request_id, None)
                streamed = getattr(request, "request_id", None) in self._streamed
                self._streamed.discard(request.request_id)
                if job is not None and not streamed:
                    self._send(request, job)
                if self.pool is not None:
                    self._to_pool(request)
            free(request)
            held = self._pool_holds.pop(getattr(request, "request_id", ""), None)
            if held is not None and status is not None and status.finished:
                kv_blocks.release(self.engine, held)
            elif held is not None:
                self._pool_holds[request.request_id] = held

        aengine.add_requests = add_requests
        bm.free = free_and_send
        if self.config.role == "prefill" and self.config.overlap:
            self.capture = LayerCapture.install(self.engine, self._stream_step)

    def _stream_step(self, scheduled: list) -> list[tuple[Any, LayerStream]]:
        """A step is about to run (engine thread): start the layer-by-layer transfer of each
        tagged request whose prompt it completes."""
        out = []
        for item in scheduled:
            req = item.request
            job = self._jobs.get(req.request_id)
            if job is None or req.request_id in self._streamed or req.num_output_tokens:
                continue
            if req.num_computed_tokens + item.num_new_tokens != req.num_tokens:
                continue  # a chunk of a longer prompt: its last step streams
            tid, dst = job
            meta, stream = stream_for(self.engine, req)
            meta["transfer_id"] = tid
            info = {"blocks": len(meta["tokens"]) // meta["block_size"], "streamed": True}
            info |= {"cached_tokens": meta["cached_tokens"], "prompt_tokens": meta["prompt_tokens"]}

            def done(error: str | None, seconds: float, tid=tid, info=info, stream=stream):
                # the transfer's own time: what was left to send once the prefill ended
                end = stream.completed_at
                tail = min(seconds, time.monotonic() - end) if end is not None else seconds
                self._done(tid, {"error": error, "seconds": tail, "total_s": seconds, **info})

            self._streamed.add(req.request_id)
            self._transport.send(tid, dst, meta, stream, done)
            out.append((req, stream))
        return out

    def _to_pool(self, request) -> None:
        """Put the request's full prompt blocks the pool lacks (engine thread)."""
        if request.status.name == "FINISHED_ABORTED":
            return
        bs = self.engine.block_manager.block_size
        prompt = list(request.prompt_token_ids)
        hashes = block_hashes(prompt, bs, tuple(request.cache_namespace))
        n = min(kv_blocks.usable_blocks(len(prompt), bs), request.num_computed_tokens // bs)
        pool = self._kv_pool
        missing = [i for i in range(n) if hashes[i] not in pool]
        if not missing:
            return
        _, layers = kv_blocks.snapshot(self.engine, request)
        for i in missing:
            pool.put(hashes[i], torch.stack([kv[:, i] for kv in layers]))

    def _from_pool(self, request_id: str, prompt: list[int], top_k) -> None:
        """Inject the prompt's leading blocks the engine lacks and the pool has (engine
        thread); held until the request finishes."""
        bm, cache = self.engine.block_manager, self.engine.runner.cache
        bs, namespace = bm.block_size, (None, top_k)
        n = kv_blocks.usable_blocks(len(prompt), bs)
        if n == 0:
            return
        probe = kv_blocks.Holder(f"pool-probe-{request_id}", prompt[: n * bs] + [0], namespace)
        cached = bm.match_prefix(probe) // bs
        hashes = block_hashes(prompt, bs, namespace)
        shape = (cache.k.shape[0], 2, *cache.k.shape[2:])  # [L, 2, bs, Hkv, D]
        got: list[torch.Tensor] = []
        for i in range(cached, n):
            kv = self._kv_pool.get(hashes[i], shape, cache.k.dtype)
            if kv is None:
                break
            got.append(kv)
        if not got:
            return
        k = cached + len(got)
        blocks = [torch.zeros(shape, dtype=cache.k.dtype)] * cached + got  # cached: not written
        layers = [torch.stack([b[layer] for b in blocks], dim=1) for layer in range(shape[0])]
        meta = {"tokens": prompt[: k * bs], "namespace": list(namespace), "block_size": bs}
        holder = kv_blocks.inject(self.engine, f"pool-{request_id}", meta, layers)
        if holder is not None:
            self._pool_holds[request_id] = holder

    def _send(self, request, job: tuple[int, int]) -> None:
        tid, dst = job
        if request.status.name == "FINISHED_ABORTED":
            self._done(tid, {"error": "the prefill request was aborted"})
            return
        try:
            meta, layers = kv_blocks.snapshot(self.engine, request)
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
            self._done(tid, {"error": f"reading the prompt's KV failed: {exc}"})
            return
        meta["transfer_id"] = tid
        info = {"blocks": len(meta["tokens"]) // meta["block_size"]}
        info |= {"cached_tokens": meta["cached_tokens"], "prompt_tokens": meta["prompt_tokens"]}

        def done(error: str | None, seconds: float) -> None:
            self._done(tid, {"error": error, "seconds": seconds, **info})

        self._transport.send(tid, dst, meta, layers, done)

    def _done(self, tid: int, result: dict) -> None:
        with self._cond:
            self._results[tid] = result
            if len(self._results) > 10_000:  # results nobody asked for
                self._results.pop(next(iter(self._results)))
            self._cond.notify_all()

    def wait_sent(self, tid: int, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while tid not in self._results:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"error": f"transfer {tid} was not sent within {timeout_s:.1f} s"}
                self._cond.wait(left)
            return self._results.pop(tid)

    # ---- decode ----------------------------------------------------------------------
    async def accept(self, tid: int, timeout_s: float) -> dict:
        arrival = await asyncio.to_thread(self._transport.wait_arrival, tid, timeout_s)

        def put() -> int:
            self._expire_holds()
            holder = kv_blocks.inject(self.engine, f"pd-hold-{tid}", arrival.meta, arrival.layers)
            if holder is None:
                return 0
            self._holds[tid] = (holder, time.monotonic() + self.config.hold_s)
            return holder.num_computed_tokens // self.engine.block_manager.block_size

        blocks = await self.state.async_engine.call(put)
        return {"blocks": blocks, "src": arrival.src}

    async def release(self, tid: int) -> None:
        def drop() -> None:
            held = self._holds.pop(tid, None)
            if held is not None:
                kv_blocks.release(self.engine, held[0])
            self._expire_holds()

        await self.state.async_engine.call(drop)

    def _expire_holds(self) -> None:
        now = time.monotonic()
        for tid in [t for t, (_, until) in self._holds.items() if until < now]:
            kv_blocks.release(self.engine, self._holds.pop(tid)[0])


def attach(app: FastAPI, config: PDConfig) -> PDInstance:
    """Give a moska server app its role: routes, middleware, and (in a thread, so that the
    server answers /pd/info while the ranks meet) the transfer group."""
    state = app.state.moska
    inst = PDInstance(config, state)
    app.state.pd = inst
    if config.role == "prefill" or inst.pool is not None:
        inst.wrap_engine()
    if config.role == "prefill":
        app.add_middleware(_TransferMiddleware)
    router = APIRouter(prefix="/pd", tags=["prefill/decode"])

    @router.get("/info")
    async def info() -> JSONResponse:
        aengine = state.async_engine
        return JSONResponse(inst.info(), 200 if aengine.alive and aengine.accepting else 503)

    @router.get("/transfer/{tid}")
    async def transfer(tid: int, timeout: float = 10.0) -> JSONResponse:
        result = await asyncio.to_thread(inst.wait_sent, tid, min(timeout, 60.0))
        return JSONResponse(result, 200 if result.get("error") is None else 502)

    @router.post("/accept/{tid}")
    async def accept(tid: int, timeout: float = 10.0) -> JSONResponse:
        if inst.transport is None or config.role != "decode":
            return JSONResponse({"error": "this instance is not a decode instance"}, 400)
        try:
            return JSONResponse(await inst.accept(tid, min(timeout, 60.0)))
        except TransferFailedError as exc:
            return JSONResponse({"error": str(exc)}, 502)

    @router.post("/release/{tid}")
    async def release(tid: int) -> JSONResponse:
        await inst.release(tid)
        return JSONResponse({"released": tid})

    app.include_router(router)
    threading.Thread(target=inst.connect, name="moska-pd-connect", daemon=True).start()
    return inst
