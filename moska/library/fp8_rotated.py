"""Rotated block-scaled FP8 libraries (`moska library build --kv-dtype fp8_rotated`): K stored
Hadamard-rotated (k R, R = `fp8.hadamard(head_dim, ROTATION_SEED)`), K and V with one e4m3
scale per 128-row block from each chunk's start (`fp8.quantize(..., "block")`, stored per
row), and every reader rotating q alike (q R: q.k = (q R).(k R)), so the routing index, built
from the exact keys before quantizing, is read with q unrotated.

Why: the rotation spreads a few large channels over all, so per-block scales keep their
precision (top-1 agreement with the bf16 library 0.9925 / 0.9914 with one-term q through the
FP8 tensor-core program, bench/results/fp8_quality_rot_chunk.json; per-token FP8 0.9946 /
0.9917) while the tensor-core program reads one K and one V scale per key block (1.43x bf16
grouped attention at B = 1,024, 1.153x end to end at B = 256 on the H200:
fp8_reach_h200_session18b.json, fp8_decode_h200_session18b.json). Off by default: `fp8`
(per-token scales) stays the FP8 form.

Where q is rotated: `LoadedLibrary.q_rotation` (set here at build and load) goes to the
grouped kernel and its PyTorch reference as `q_rotation` (attention/shared.fp8_kwargs) and to
the tensor-core program with `block_sides` 3 (library/fp8_mma.attach_token_major_v). Tiered
libraries: `ChunkTiers.q_rotation` (set by tiered_load), passed at every launch over the slots
(their token-major V copy reads per-row scales: exact for block ones). Composed requests: an
FP8 part is never in the arena, so it is a launch group of its own (attention/composed.py)
whose `fp8_kwargs` carry its rotation; the other parts' launches read q as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from moska.library.errors import LibraryError
from moska.library.fp8 import _ROWS_PER_STEP, hadamard, quantize

ROTATION_SEED = 0  # the sign pattern of R; part of the format: never change it
ROTATED = "rotated"


def build_format(kv_dtype: str) -> tuple[str, str]:
    """A build's kv_dtype (format.BUILD_KV_DTYPES) -> the manifest's (kv_dtype, fp8_format)."""
    return ("fp8", ROTATED) if kv_dtype == "fp8_rotated" else (kv_dtype, "token")


def check_build(fp8_format: str, head_dim: int) -> None:
    """LibraryError before a build's prefill when ``fp8_format`` cannot be stored for it."""
    if fp8_format == ROTATED and (head_dim < 1 or head_dim & (head_dim - 1)):
        raise LibraryError(
            f"kv_dtype fp8_rotated needs a power-of-two head dim (a Hadamard rotation), "
            f"the model's is {head_dim}: build with kv_dtype fp8"
        )


def quantize_pair(
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,  # [S, Hkv, D]
    offsets: torch.Tensor,  # [C + 1] int
    fp8_format: str,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One KV slot's e4m3 (k, v, (k_scale, v_scale)) in ``fp8_format``."""
    if fp8_format == ROTATED:
        rot, kr = rotation(k.shape[-1], k.device, torch.float32), torch.empty_like(k)
        for r in range(0, k.shape[0], _ROWS_PER_STEP):  # fp32 products, no fp32 pool copy
            kr[r : r + _ROWS_PER_STEP] = k[r : r + _ROWS_PER_STEP].float() @ rot
        kq, vq = quantize(kr, offsets, "block"), quantize(v, offsets, "block")
    else:
        kq, vq = quantize(k, offsets), quantize(v, offsets)
    return kq.data, vq.data, (kq.scale, vq.scale)


def rotation(head_dim: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The format's R [D, D] on ``device`` in ``dtype``."""
    return hadamard(head_dim, ROTATION_SEED).to(device=device, dtype=dtype)


def is_rotated(library: Any) -> bool:
    """Whether ``library`` (a LoadedLibrary, LibraryInfo or Manifest) is a rotated FP8 one."""
    m = getattr(library, "manifest", library)
    return getattr(m, "fp8_format", "token") == ROTATED


def q_rotation_for(manifest: Any, device: torch.device | str) -> torch.Tensor | None:
    """The q rotation a library of ``manifest`` is read with (None: not rotated), in the
    model's dtype (what q arrives in: the kernel's matmul runs in q's dtype)."""
    if not is_rotated(manifest):
        return None
    return rotation(manifest.model.head_dim, device, getattr(torch, manifest.model.dtype))
