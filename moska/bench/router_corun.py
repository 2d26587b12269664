"""Can the default router run beside a memory-bound kernel at all? (#17.3)

The routed step can only hide the router behind the unique-KV attention (the one part that
does not wait for the router's choices) if an SM can run the router's tensor-core tiles and
a read stream's loads at the same time. Session 18's schedules (``router_overlap.py``: side
streams, priorities, grid caps, green contexts) found no overlap, but there the unique
attention's grid holds thousands of programs, so whichever kernel starts first may just
hold every SM until its last wave. This probe removes that: a read-only stream with a
persistent grid of P programs (P = one or two per SM: every program resident from the
start, room left on each SM) over as many bytes as the unique KV, beside the default
router (its own grid, or capped to persistent programs too). Times (CUDA events, medians):
each alone, then both launched together on two streams in both orders. ``overlap`` =
(a + b - both) / min(a, b): 1 is full hiding, 0 is back to back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
import triton
import triton.language as tl

from moska.bench.router_variants import route_fn
from moska.kernels.router_dense import keymax_dense_scores


@triton.jit
def _persistent_sum_kernel(x_ptr, out_ptr, n, n_tiles, BLOCK: tl.constexpr):
    # grid-stride over BLOCK-element tiles: P programs, each resident for the whole run
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def persistent_stream(x: torch.Tensor, programs: int, block: int = 4096) -> Callable:
    """A read-only stream over x with a grid of ``programs`` (sum of x, per program)."""
    n = x.numel()
    n_tiles = triton.cdiv(n, block)
    out = torch.empty(programs, dtype=torch.float32, device=x.device)

    def run() -> torch.Tensor:
        _persistent_sum_kernel[(programs,)](x, out, n, n_tiles, BLOCK=block, num_warps=8)
        return out

    return run


def _ms(fn: Callable, reps: int, cuda: bool) -> float:
    """Median ms over reps (CUDA events on the GPU, the host clock on CPU)."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def together(first: Callable, second: Callable, cuda: bool) -> Callable:
    """Both kernels forked onto two streams from the current one, ``first`` enqueued first
    (on a high-priority stream), joined again; on CPU they just run in order."""
    if not cuda:
        return lambda: (first(), second())
    hi = torch.cuda.Stream.priority_range()[1]  # type: ignore[call-arg]
    s1, s2 = torch.cuda.Stream(priority=hi), torch.cuda.Stream()

    def run():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            first()
        with torch.cuda.stream(s2):
            second()
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    return run


def corun_probe(routers: dict, x: torch.Tensor, stream_programs: list[int], reps: int) -> dict:
    """Per router (name -> fn) and stream grid P: each alone, both together in both orders,
    and the overlap fractions."""
    cuda = x.is_cuda
    out: dict = {"stream_bytes": x.numel() * x.element_size()}
    alone = {f"router_{n}": _ms(fn, reps, cuda) for n, fn in routers.items()}
    streams = {p: persistent_stream(x, p) for p in stream_programs}
    for p, fn in streams.items():
        alone[f"stream_p{p}"] = _ms(fn, reps, cuda)
        out[f"stream_p{p}_GBps"] = out["stream_bytes"] / alone[f"stream_p{p}"] / 1e6
    out.update({f"{k}_ms": v for k, v in alone.items()})
    for n, r in routers.items():
        for p, s in streams.items():
            a, b = alone[f"router_{n}"], alone[f"stream_p{p}"]
            for order, fn in (("router_first", together(r, s, cuda)),
                              ("stream_first", together(s, r, cuda))):  # fmt: skip
                t = _ms(fn, reps, cuda)
                key = f"{n}_with_stream_p{p}_{order}"
                out[f"{key}_ms"] = t
                out[f"{key}_overlap"] = (a + b - t) / min(a, b)
    return out


# key-max tiles (requests, warps, stages; 128-key blocks) the co-run probe runs at one
# program per SM: the current tile, and wider ones that might keep the tensor cores fed
# from one program per SM (session 18 call 5: the current tile at one program per SM
# overlaps a read stream by 0.75-0.78 but runs 6.5 ms alone against 4.0 uncapped)
CORUN_TILES = ((32, 4, 4), (32, 8, 4), (64, 8, 4), (64, 8, 3))


def corun_row(B: int, shape: dict, index, dev: str) -> dict:
    """router_corun's probe at B: the default router (own grid, 1 and 2 programs per SM) and
    its key-max scores at one program per SM in CORUN_TILES, beside a persistent read stream
    over as many bytes as the unique KV."""
    q = torch.randn(B, shape["Hq"], shape["D"], device=dev, dtype=index.basis.dtype)
    names = ("default", "default_p1", "default_p2")
    routers = {n: route_fn(n, q, index, shape["topk"]) for n in names}
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 2
    for bb, nw, ns in CORUN_TILES:  # the key-max scores alone, one program per SM
        routers[f"scores_p1_b{bb}w{nw}s{ns}"] = partial(
            keymax_dense_scores, q, index.basis, index.lowrank_keys, index.chunk_offsets,
            block_b=bb, block_n=128, num_warps=nw, num_stages=ns, max_programs=sms,
        )  # fmt: skip
    x = torch.randn(B * shape["U"] * shape["Hkv"] * shape["D"] * 2, device=dev, dtype=q.dtype)
    out = corun_probe(routers, x, [2 * sms, 4 * sms], reps=5 if dev == "cuda" else 1)
    del x
    return {"B": B, **out}
