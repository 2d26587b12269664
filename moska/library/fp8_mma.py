"""FP8 libraries read by the FP8 tensor-core program (`fp8_mma` with V token-major,
kernels/shared_attention_fp8.py) instead of the upcast one: `--fp8-attention mma`.

Why a second copy of V: FP8 wgmma wants P.V's B operand K-major, i.e. V as [D, tokens];
the library's [S, Hkv, D] layout makes the compiler transpose V's tile in shared memory,
and that made fp8_mma as slow as the upcast program (H200, Llama-3.1-8B dims, 1M-token
library, top-8 of 4,096-token chunks: B = 256 upcast 1.82 ms, fp8_mma 1.88, with V
token-major 0.69, bf16 0.99; B = 1,024: 4.39 / 4.51 / 1.65 / 1.61 ms;
bench/results/fp8_attention_h200_mma.json). Every other reader of the library (the upcast
program, the PyTorch reference, saving, the CPU and disk tiers, shared-KV ranks) reads
[S, Hkv, D] with D contiguous, so the library keeps V as stored and this adds a token-major
copy [Hkv, D, S padded to 16] per KV slot at load: one more byte per token, KV head and
dim, +50% of the FP8 library's K + V bytes (still 0.75x its bf16 size).

Tiered libraries (library/tiers.py): the copy is of the GPU slot pools, [Hkv, D, slots *
slot_rows] per layer, and `ChunkTiers._fill` writes a chunk's columns of it on the copy
stream right after its V rows (a device-side transpose of the slot just filled), so the
copy holds every resident slot. It comes out of `--library-gpu-budget`: the slots are cut
to what the budget holds with the copy (an FP8 row costs Hkv * (2D + 8) bytes, with the
copy Hkv * (3D + 8): about 2/3 of the slots at D = 128); the slots must start at multiples
of 16 rows (a chunk size of a multiple of 16). `ChunkTiers._run` passes the keywords
(`mma_kwargs`) only to the Triton ops (`ops.name == "triton"`). Composed requests: their
launches (attention/composed.py) pass FP8 parts `kv_scales` only, so the upcast program reads
them, resident or tiered (the copy of a tiered part stays in step, unread there), except a
tiered part that composed.py hands to `ChunkTiers.attend`, which reads it as above.

Upcast or tensor cores by batch (H200, 8B dims, 1M-token library, top-8 of 4,096-token chunks,
per-token scales, bench/results/fp8_attention_h200_session16.json): upcast 1.584 / 1.818 /
4.341 ms, tensor cores 0.646 / 0.764 / 1.662 ms at B = 64 / 256 / 1,024 (bf16 0.869 / 1.012 /
1.592): the tensor-core program is 2.4-2.6x faster at every batch measured, so there is no
batch below which upcast is chosen for speed; the default stays upcast for its numerics.

Numerics: q and the softmax weights are cut to e4m3 (2^-4 relative); on moska-code-20m
one-term q gave top-1 agreement 0.9899 / 0.9873 with the bf16 library, under the 0.99
target, two-term q (`mma_qsplit`) 0.993 (bench/results/fp8_quality_mma.json). So the
default stays `upcast` (exact on the e4m3 values) and `mma` / `mma_qsplit` are opt-in.
Two-term q is needed in the later layers only (`mma_qsplit_late`: the later half, 0.9935 /
0.9932; the first half only 0.9902 / 0.9873, fp8_quality_layers.json), and V's scales may be
per 128-row block with K's per token (0.9932 / 0.9922, fp8_quality_mixed.json; found at
attach, `v_block_rows`): each saves time at B = 1,024 on the H200 (q split 1.54 ms, with V
block scales 1.42, one-term q with them 1.19; bf16 1.53: fp8_attention_h200_session17c.json),
both together 1.11x bf16 end to end at B = 256 (fp8_decode_h200_session17c.json).
Session 18: a library whose K is stored Hadamard-rotated (k R, library/fp8.hadamard) with K
and V scales per 128-row block keeps top-1 0.9925 / 0.9914 with one-term q (q R at launch:
`TokenMajorV.q_rotation`, `block_sides` 3; fp8_quality_rot_chunk.json): 1.43x bf16 at
B = 1,024, 1.153x end to end at B = 256 (fp8_reach_h200_session18b.json,
fp8_decode_h200_session18b.json). `library build --kv-dtype fp8_rotated` stores them
(library/fp8_rotated.py); attached here with `block_sides` 3 and the library's q_rotation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

FP8_ATTENTION = ("upcast", "mma", "mma_qsplit", "mma_qsplit_late")
# the tile that was fast for fp8_mma_vt on the H200 (the launcher's default took 1.28 ms at
# B = 256, this 0.69; 128-row tiles 4-6 ms): bench/results/fp8_attention_h200_mma.json
# (warp_specialize False: the FP8 program's key loop is not warp-specialized whatever the bf16
# tile table, shared_tuning.py, says; it is measured apart, bench/device_session16_fp8.sh)
MMA_TILE: dict[str, Any] = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3}
MMA_TILE.update(warp_specialize=False)


@dataclass(frozen=True)
class TokenMajorV:
    """A library's V copies for the FP8 tensor-core program: per KV slot [Hkv, D, S_pad]."""

    pools: list[torch.Tensor]
    q_split: bool  # q as two e4m3 terms (two QK^T dots, 2^-8 relative q error)
    nbytes: int  # the extra GPU memory
    # > 0: the library's V scales are constant over this many rows from each chunk's start
    # (library/fp8.py "block" for V, K per token): the kernel reads one V scale per key block
    # and skips the per-weight V multiply (SidedBlock); top-1 0.9932 / 0.9922 with q split,
    # bench/results/fp8_quality_mixed.json
    v_block_rows: int = 0
    # q split only in KV slots >= this one (one-term q below): the split keeps top-1 >= 0.99
    # when made in the later half of the layers only (0.9935 / 0.9932 on the quality model,
    # first half only 0.9902 / 0.9873: bench/results/fp8_quality_layers.json)
    q_split_from: int = 0
    # with v_block_rows: 2 only V's scales are per block, 3 K's too (one K and one V scale
    # per key block: per-chunk speed); q_rotation [D, D]: K stored rotated (k R,
    # library/fp8.hadamard), q rotated alike at launch. Rotated K with both per block keeps
    # top-1 0.9925 / 0.9914 with one-term q (bench/results/fp8_quality_rot_chunk.json);
    # `library build --kv-dtype fp8_rotated` stores such libraries (library/fp8_rotated.py)
    block_sides: int = 2
    q_rotation: torch.Tensor | None = None


def mma_unfit(library: Any) -> str | None:
    """Why `library` cannot be read by the FP8 tensor-core program (None: it can)."""
    if not library.kv_scale_pools:
        return "not an FP8 library"
    k, v = library.k_pools[0], library.v_pools[0]
    if k.device.type != "cuda":
        return f"on {k.device.type} (FP8 tensor cores: CUDA only)"
    from moska.kernels.shared_inputs import tma_ok

    if not tma_ok(k, v):
        return "needs Hopper's TMA and 16-byte aligned pools"
    if library.tiers is not None:
        return tier_unfit(library.tiers)
    starts = library.chunk_offsets[:-1]
    if bool((starts % 16 != 0).any()):
        return "a chunk starts off a multiple of 16 rows (TMA offsets)"
    return None


def attach_token_major_v(library: Any, mode: str) -> str | None:
    """Give `library` its token-major V copies when `mode` is mma / mma_qsplit and it fits
    (`mma_unfit`); returns why not (None: attached, or mode "upcast")."""
    if mode not in FP8_ATTENTION:
        raise ValueError(f"fp8_attention must be one of {', '.join(FP8_ATTENTION)}, not {mode!r}")
    if mode == "upcast":
        return None
    why = mma_unfit(library)
    if why is not None:
        return why
    split = mode.startswith("mma_qsplit")
    late = len(library.v_pools) // 2 if mode == "mma_qsplit_late" else 0
    if library.tiers is not None:
        attach_tiered(library, split, late)
        return None
    pools = [token_major(v) for v in library.v_pools]
    nbytes = sum(t.numel() * t.element_size() for t in pools)
    vb = v_block_rows(library)
    rot = getattr(library, "q_rotation", None)  # rotated: K's scales per block too (3 sides)
    library.fp8_mma = TokenMajorV(
        pools, split, nbytes, q_split_from=late, v_block_rows=vb, q_rotation=rot,
        block_sides=3 if rot is not None and vb else 2,
    )  # fmt: skip
    return None


def v_block_rows(library: Any) -> int:
    """BLOCK_ROWS when every layer's V scales are constant over BLOCK_ROWS rows from each
    chunk's start (V quantized per "block", K per token: library/fp8.py), else 0: such a
    library is read with one V scale per key block (exact for it, whatever built it)."""
    from moska.library.fp8 import BLOCK_ROWS

    scales = library.kv_scale_pools
    if not scales or scales[0][1].shape[0] != library.k_pools[0].shape[0]:
        return 0  # per-chunk or per-layer scales: not per row
    offs = library.chunk_offsets.to(scales[0][1].device, torch.int64)
    rows = torch.arange(int(offs[-1]), device=offs.device)
    start = offs[torch.searchsorted(offs, rows, right=True) - 1]  # each row's chunk start
    first = start + (rows - start) // BLOCK_ROWS * BLOCK_ROWS  # each row's block start
    return BLOCK_ROWS if all(torch.equal(vs, vs[first]) for _, vs in scales) else 0


def tier_unfit(tiers: Any) -> str | None:
    """Why a tiered FP8 library's slots cannot be read by the FP8 tensor-core program."""
    if tiers.slot_rows % 16:
        return f"tiered in slots of {tiers.slot_rows} rows, not a multiple of 16 (TMA offsets)"
    if slots_with_copy(tiers) < 1:
        return "library_gpu_budget holds no chunk with its token-major V copy: raise it"
    return None


def slots_with_copy(tiers: Any) -> int:
    """The slots per layer that the bytes of `tiers`' slot pools hold with the V copy (the
    copy is paid for out of the GPU budget the slots were sized from)."""
    hkv, d = tiers.v_pools[0].shape[1:]
    return tiers.num_slots * tiers.row_bytes // (tiers.row_bytes + hkv * d)


def attach_tiered(library: Any, q_split: bool, q_split_from: int = 0) -> TokenMajorV:
    """A tiered FP8 library's token-major V copy of its GPU slot pools (`tier_unfit` None):
    the slots cut to `slots_with_copy` first (what they hold is dropped: the next step
    fetches it again), then the copy made of the slot pools as they are, so it starts in
    step with every resident slot; `ChunkTiers._fill` keeps it so."""
    tiers = library.tiers
    slots = slots_with_copy(tiers)
    if slots < tiers.num_slots:
        _cut_slots(tiers, slots)
        if library.kv_scale_pools is not None:  # the library's view of the scale pools
            sp = tiers.slot_pools
            library.kv_scale_pools[:] = list(zip(sp["k_scale"], sp["v_scale"]))
    pools = [token_major(v) for v in tiers.v_pools]
    nbytes = sum(p.numel() * p.element_size() for p in pools)
    rot = getattr(tiers, "q_rotation", None)  # (per-row scales read: block_sides unused)
    t = TokenMajorV(pools, q_split, nbytes, q_split_from=q_split_from, q_rotation=rot)
    tiers.fp8_mma = library.fp8_mma = t
    return t


def _cut_slots(tiers: Any, slots: int) -> None:
    """`tiers` with `slots` GPU slots per layer, none resident (new pools: the old ones'
    memory is freed; `tiers.k_pools` / `v_pools` are the lists the library holds, refilled)."""
    from moska.library.chunk_cache import SlotCache

    if tiers.device.type == "cuda":
        torch.cuda.synchronize(tiers.device)  # no copy or launch still on the old pools
    rows = slots * tiers.slot_rows
    for key, pools in tiers.slot_pools.items():
        init = torch.ones if key.endswith("_scale") else torch.zeros  # as ChunkTiers makes them
        for i, p in enumerate(pools):
            pools[i] = init((rows, *p.shape[1:]), dtype=p.dtype, device=p.device)
    tiers.num_slots = slots
    tiers.caches = [SlotCache(slots, tiers.config.eviction) for _ in tiers.caches]
    for starts, ends in tiers.tables:
        ends.copy_(starts)  # every chunk absent


def attach_at_register(name: str, library: Any, mode: str) -> None:
    """The library manager's hook as a library is registered: an FP8 library without its
    copies gets them under mma / mma_qsplit, and the log says which program will read it."""
    attached: TokenMajorV | None = library.fp8_mma
    if not library.kv_scale_pools or attached is not None or mode == "upcast":
        return
    why = attach_token_major_v(library, mode)
    if why is not None:
        logger.warning("library %r: fp8_attention %s off, upcast: %s", name, mode, why)
    else:
        gib = library.fp8_mma.nbytes / 2**30
        logger.info("library %r: fp8_attention %s, token-major V copy %.3f GiB", name, mode, gib)
        if library.tiers is not None:
            logger.info(
                "library %r: %d GPU slots per layer with the copy", name, library.tiers.num_slots
            )


def token_major(v_pool: torch.Tensor) -> torch.Tensor:
    """[S, Hkv, D] -> contiguous [Hkv, D, S padded up to 16], the padding zero."""
    s, hkv, d = v_pool.shape
    out = torch.zeros(hkv, d, -(-s // 16) * 16, dtype=v_pool.dtype, device=v_pool.device)
    out[:, :, :s].copy_(v_pool.permute(1, 2, 0))
    return out


def mma_kwargs(library: Any, layer: int) -> dict[str, Any]:
    """The grouped kernel's FP8 tensor-core keywords for `library`'s KV slot `layer` (with
    its `kv_scales`), or {} when it has no token-major V (the upcast program then).
    `library`: a LoadedLibrary or a ChunkTiers (its `fp8_mma`: the slot pools' copy)."""
    t = getattr(library, "fp8_mma", None)
    if t is None:
        return {}
    kw = {
        "fp8_mma": True,
        "v_pool_t": t.pools[layer],
        "fp8_q_split": t.q_split and layer >= t.q_split_from,
        "use_tma": True,
        **MMA_TILE,
    }
    if t.v_block_rows:
        from moska.kernels.shared_attention_fp8 import SidedBlock

        rows = t.v_block_rows
        kw["fp8_scale_block"] = SidedBlock(rows, 2) if t.block_sides == 2 else rows
    if t.q_rotation is not None:
        kw["q_rotation"] = t.q_rotation
    return kw
