"""KV transfer between a prefill and a decode rank (`moska.pd.transport`), and its overlap
with the prefill that computes the KV: the same-host channel (`--pd-transport`, default
auto: CUDA IPC on a GPU, shared memory on CPU; `pd/ring.py`) against gloo in the same run.

The decode rank is its own process (spawned; it copies each received transfer onto its
device, as a decode instance writes its blocks). On a GPU host with several GPUs it runs
on the next GPU, placed as `moska router --pd` places a decode instance (its
CUDA_VISIBLE_DEVICES lists its own GPU first, then the others; `pd/gpu_placement.py`), so
CUDA IPC copies peer to peer; `--same-gpu` shares the prefill's GPU. Measured, in one run:

- `raw`: seconds and GB/s to send a prompt of N tokens' KV (`--raw-tokens`) at the model's
  KV dims, layer by layer; baseline: one host copy of the same bytes.
- `overlap`: from a prompt's arrival at the prefill engine until the decode rank holds its
  KV, (a) `prefill_only`: the engine's prefill alone (no transfer), (b) `sequential`: the
  whole prompt's KV sent after the request finished (`kv_blocks.snapshot`, the path
  without overlap), (c) `overlapped`: each layer sent as soon as the prefill step computed
  it (`pd/stream.LayerCapture`, what a prefill instance does), while the next layers
  compute. Also the seconds from the prefill's end to the KV at the decode rank (what a
  request waits for beyond its prefill): `hidden_share` = 1 - overlapped / sequential of
  those (on a shared CPU host the prefill times vary more than the transfer lasts).
  Every transfer is checked against the sender's bytes (integer sums per layer).

Both phases (gloo first, then `--pd-transport`) run all of it with a fresh decode process;
the raw layers start on the engine's device (gloo stages them through the host, as an
instance does). `summary` is the chosen transport's, `summary.gloo` the baseline's.

The model: the built-in tiny model on CPU; with --model-dims llama-3.1-8b a random
Llama-3.1-8B-shaped bf16 model (the device form).

    python -m moska.bench.pd_transfer --cpu-dry-run
    python -m moska.bench.pd_transfer --device cuda --model-dims llama-3.1-8b --tokens 8192 \
        --pd-transport cuda_ipc
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import random
import statistics
import threading
import time
from typing import Any

import torch

from moska.pd.endpoint import TransferEndpoint
from moska.pd.stream import LayerStream
from moska.pd.transport import KVTransport


def _checksums(layers, device: str) -> list[tuple[int, int]]:
    """Per layer, integer sums of its 16-bit words, plain and position-weighted: exact at
    both ends whatever the device or thread count (a float sum is not)."""
    out = []
    for t in layers:
        w = t.to(device).contiguous().view(-1).view(torch.int16).to(torch.int64)
        weights = torch.arange(w.numel(), device=w.device) % 1009
        out.append((int(w.sum()), int((w * weights).sum())))
    return out


def _report_failure(tid: int, results):
    """A send's `done`: a failed send answers the waiting run at once (the decode rank,
    never getting it, would not)."""

    def done(error: str | None, _seconds: float) -> None:
        if error is not None:
            results.put((tid, 0.0, f"the send failed: {error}"))

    return done


def decode_rank(port: int, device: str, expected: int, results, mode: str = "auto") -> None:
    """The decode process: receive `expected` transfers in id order, copy each to `device`,
    report (id, when it was there: time.monotonic(), checksums)."""
    torch.set_num_threads(1)
    rank = KVTransport(TransferEndpoint("127.0.0.1", port, 1, 2, 120.0, mode))
    rank.connect()
    rank.start_receiving([0])
    try:
        for tid in range(expected):
            arrival = rank.wait_arrival(tid, 300.0)
            on_device = [t.to(device, non_blocking=True) for t in arrival.layers]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            landed = time.monotonic()  # (the sender's clock too: CLOCK_MONOTONIC)
            results.put((tid, landed, _checksums(on_device, device)))
            del on_device
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put((-1, 0.0, str(exc)))
    finally:
        rank.close()


class _Prefill:
    """The prefill side: an engine, the transfer rank, and the hooks of both send paths."""

    def __init__(self, engine, transport: KVTransport | None = None, results=None) -> None:
        from moska.pd import kv_blocks
        from moska.pd.stream import LayerCapture, stream_for

        self.engine, self.transport, self.results = engine, transport, results
        self.tid, self.mode = 0, "prefill_only"
        self.sent: dict[int, Any] = {}  # tid -> layers or stream (for the checksums)
        bm = engine.block_manager
        free = bm.free

        def free_and_send(request) -> None:  # the sequential path: after the request ends
            if self.mode == "sequential" and getattr(request, "request_id", "").startswith("q"):
                _, layers = kv_blocks.snapshot(engine, request)
                self._send(layers)
            free(request)

        def on_step(scheduled):  # the overlapped path: during the step that ends the prompt
            if self.mode != "overlapped":
                return []
            req = scheduled[0].request
            _, stream = stream_for(engine, req)
            self._send(stream)
            return [(req, stream)]

        bm.free = free_and_send
        LayerCapture.install(engine, on_step)

    def _send(self, layers) -> None:
        tid = self.tid
        self.sent[tid] = layers
        assert self.transport is not None
        self.transport.send(tid, 1, {"tokens": []}, layers, _report_failure(tid, self.results))

    def run(self, prompt: list[int]) -> tuple[float, float, bool]:
        """Seconds from the request's arrival until the decode rank holds its KV (or, for
        prefill_only, until the prefill finished); of those, the seconds after the prefill
        finished (the transfer it did not hide); whether the bytes arrived intact."""
        from moska.engine.sampling_params import SamplingParams

        dev = self.engine.runner.cache.k.device
        t0 = time.monotonic()
        self.engine.add_request(f"q{t0}", prompt, SamplingParams(max_tokens=1))
        while self.engine.has_unfinished_requests():
            self.engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_prefilled = time.monotonic()
        if self.mode == "prefill_only":
            return t_prefilled - t0, 0.0, True
        tid, t_end, sums = self.results.get(timeout=300)
        if tid != self.tid or isinstance(sums, str):
            raise RuntimeError(f"transfer {self.tid} failed at the decode rank: {sums}")
        sent = self.sent.pop(tid)
        layers = (
            [sent.layer(i, 60.0) for i in range(len(sent))]
            if isinstance(sent, LayerStream)
            else sent
        )
        self.tid += 1
        exact = _checksums(layers, str(dev)) == sums
        return t_end - t0, max(0.0, t_end - t_prefilled), exact


def _engine(args):
    from moska.bench.common import LLAMA_3_1_8B, random_loaded_model
    from moska.config import EngineConfig
    from moska.engine.llm_engine import LLMEngine

    blocks = 4 * (args.tokens // args.block_size + 1) * (args.repeats + 1) + 64
    kw = {"device": args.device, "num_kv_blocks": blocks, "max_model_len": args.tokens + 64,
          "max_num_batched_tokens": args.tokens + 64, "enforce_eager": True,
          "block_size": args.block_size}  # fmt: skip
    if args.model_dims == "tiny":
        return LLMEngine.from_model(None, **kw)
    loaded = random_loaded_model(LLAMA_3_1_8B, torch.bfloat16, args.device)
    return LLMEngine(EngineConfig(model="random-llama-3.1-8b", **kw), loaded)


def raw_transfer(transport: KVTransport, results, layers: list[torch.Tensor], tid0: int, n: int):
    """Seconds of `n` sends of `layers` (ids tid0...), checked; the host-copy baseline."""
    times, exact = [], True
    for k in range(n):
        t0 = time.monotonic()
        transport.send(tid0 + k, 1, {"tokens": []}, layers, _report_failure(tid0 + k, results))
        tid, landed, sums = results.get(timeout=300)
        if tid != tid0 + k or isinstance(sums, str):
            raise RuntimeError(f"transfer {tid0 + k} failed: {sums}")
        times.append(landed - t0)
        exact = exact and sums == _checksums(layers, str(layers[0].device))
    host = [t.cpu() for t in layers]
    dst = [torch.empty_like(t) for t in host]
    t0 = time.perf_counter()
    for a, b in zip(dst, host):
        a.copy_(b)
    return times, time.perf_counter() - t0, exact


def _phase(args, mode: str, engine, prefill: _Prefill, raw_layers, rng) -> dict:
    """The raw transfers and the three paths of one transport, with its own decode process."""
    from moska.pd.cluster import free_port

    modes = ("prefill_only", "sequential", "overlapped")
    expected = 2 * args.repeats + args.repeats + 1  # raw, then (warm-up +) both send paths
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(
        target=decode_rank, args=(port, args.decode_device, expected, results, mode)
    )
    with _environ("CUDA_VISIBLE_DEVICES", args.decode_visible):
        child.start()  # (spawn: the child's CUDA sees only what this says)
    transport = KVTransport(TransferEndpoint("127.0.0.1", port, 0, 2, 120.0, mode))
    joined = threading.Thread(target=transport.connect)
    joined.start()
    joined.join(300)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    after_prefill: dict[str, list[float]] = {m: [] for m in modes}
    exact = True
    try:
        raw_s, copy_s, raw_exact = raw_transfer(transport, results, raw_layers, 0, args.repeats)
        prefill.transport, prefill.results = transport, results
        prefill.tid, prefill.sent = args.repeats, {}
        for rep in range(args.repeats + 1):  # round 0 warms up each path, not counted
            for m in modes:
                if rep == 0 and m == "sequential":
                    continue  # one warm-up transfer (overlapped) is enough for the decode rank
                prefill.mode = m
                prompt = [rng.randrange(10, 250) for _ in range(args.tokens)]  # no cache hit
                s, after, ok = prefill.run(prompt)
                exact = exact and ok
                if rep > 0:
                    seconds[m].append(s)
                    after_prefill[m].append(after)
    except queue.Empty as exc:
        raise RuntimeError("the decode rank did not answer within 300 s") from exc
    finally:
        transport.close()
        child.join(30)
        if child.is_alive():
            child.kill()
    nbytes = sum(t.numel() * t.element_size() for t in raw_layers)
    med = {m: statistics.median(v) for m, v in seconds.items()}
    tail = {m: statistics.median(v) for m, v in after_prefill.items()}
    summary = {
        "channel": transport.channels.get(1),
        "raw_transfer_s": round(min(raw_s), 5),
        "raw_per_layer_ms": round(min(raw_s) / len(raw_layers) * 1e3, 3),
        "raw_gb_per_s": round(nbytes / min(raw_s) / 1e9, 3),
        "host_copy_gb_per_s_baseline": round(nbytes / copy_s / 1e9, 3),
        # medians over the repeats: prompt arrival -> KV at the decode rank
        "prefill_only_s": round(med["prefill_only"], 5),
        "sequential_s": round(med["sequential"], 5),
        "overlapped_s": round(med["overlapped"], 5),
        "overlapped_over_sequential": round(med["overlapped"] / med["sequential"], 3),
        # the transfer left after the prefill ended (what a request waits for)
        "sequential_after_prefill_s": round(tail["sequential"], 5),
        "overlapped_after_prefill_s": round(tail["overlapped"], 5),
        "hidden_share": round(1 - tail["overlapped"] / tail["sequential"], 3)
        if tail["sequential"] > 0
        else None,
        "exact": bool(raw_exact and exact),
    }
    return {"raw_seconds": raw_s, "seconds": seconds, "after_prefill_seconds": after_prefill,
            "summary": summary}  # fmt: skip


@contextlib.contextmanager
def _environ(key: str, value: str | None):
    """`key` set to `value` (None: unchanged) while a child process starts."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                del os.environ[key]
            else:
                os.environ[key] = old


def place_decode(device: str, same_gpu: bool) -> tuple[str, str | None]:
    """(the decode rank's device, its CUDA_VISIBLE_DEVICES or None): the second GPU when
    `device` is a plain cuda and several are visible (as the cluster places instances)."""
    from moska.pd import gpu_placement

    if same_gpu or device not in ("cuda", "auto"):
        return device, None
    placed = gpu_placement.plan(
        2, "cuda", gpu_count=gpu_placement.visible_gpu_count(),
        parent_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )  # fmt: skip
    return device, placed[1]


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment, write_json
    from moska.pd.endpoint import TRANSPORTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--model-dims", choices=("tiny", "llama-3.1-8b"), default="llama-3.1-8b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pd-transport", choices=TRANSPORTS, default="auto",
                    help="the transport measured against gloo (auto: CUDA IPC or shm)")  # fmt: skip
    ap.add_argument("--raw-tokens", type=int, default=None,
                    help="prompt tokens of the raw transfers (default --tokens; 8192 in the dry "
                    "run, so that it measures bandwidth, not latency)")  # fmt: skip
    ap.add_argument("--same-gpu", action="store_true",
                    help="the decode rank on the prefill's GPU (default: the next GPU)")  # fmt: skip
    ap.add_argument("--out", default="bench/results/pd_transfer.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model, 512 tokens, CPU")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.tokens, args.model_dims, args.device, args.repeats = 512, "tiny", "cpu", 3
        args.raw_tokens = args.raw_tokens or 8192
        if args.out == "bench/results/pd_transfer.json":
            args.out = "bench/results/pd_transfer_cpu.json"
    args.decode_device, args.decode_visible = place_decode(args.device, args.same_gpu)
    engine = _engine(args)
    cache = engine.runner.cache
    args.raw_tokens = args.raw_tokens or args.tokens
    n_blocks = (args.raw_tokens - 1) // args.block_size
    shape = (2, n_blocks, *cache.k.shape[2:])
    num_layers = int(cache.k.shape[0])
    raw_layers = [
        torch.randn(shape, device=cache.k.device).to(cache.k.dtype) for _ in range(num_layers)
    ]
    if cache.k.is_cuda:
        torch.cuda.synchronize(cache.k.device)  # the rings copy on their own streams
    prefill = _Prefill(engine)
    rng = random.Random(0)
    for _ in range(2):  # the engine's own warm-up, before either phase
        prefill.run([rng.randrange(10, 250) for _ in range(args.tokens)])
    phases = {"gloo": _phase(args, "gloo", engine, prefill, raw_layers, rng)}
    if args.pd_transport != "gloo":
        phases[args.pd_transport] = _phase(
            args, args.pd_transport, engine, prefill, raw_layers, rng
        )
    main_phase = phases[args.pd_transport]
    nbytes = sum(t.numel() * t.element_size() for t in raw_layers)
    summary = dict(main_phase["summary"])
    base = phases["gloo"]["summary"]
    summary["transport"] = args.pd_transport
    summary["raw_speedup_over_gloo"] = round(base["raw_transfer_s"] / summary["raw_transfer_s"], 2)
    summary["gloo"] = {k: base[k] for k in (
        "raw_gb_per_s", "raw_per_layer_ms", "overlapped_s", "sequential_after_prefill_s",
        "overlapped_after_prefill_s", "hidden_share", "exact")}  # fmt: skip
    report = {
        "benchmark": "pd_transfer",
        "environment": environment(),
        "config": vars(args) | {"layer_shape": list(shape), "layers": num_layers, "bytes": nbytes},
        "phases": phases,
        "summary": summary,
    }
    write_json(args.out, report)
    print(report["summary"], f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
