"""LoadedLibrary, the runtime form of a library, and `load_library` (verify, then load)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moska.library.errors import (
    ChecksumMismatchError,
    CorruptLibraryError,
    FingerprintMismatchError,
    LibraryNotFoundError,
)
from moska.library.format import (
    MANIFEST_FILE,
    TOKENS_FILE,
    ChunkEntry,
    ChunkSpan,
    Manifest,
    ModelFingerprint,
    layer_file,
    library_files,
    read_manifest,
    sha256_file,
    validate_file_name,
    validate_name,
)

INDEX_PREFIX = "index."


@dataclass(eq=False)
class LoadedLibrary:
    """A library in memory. KV slot ``l``'s KV (layer ``l``'s, unless MLKV: model/mlkv.py)
    is ``k_pools[l], v_pools[l]`` [S_total, Hkv, D];
    chunk ``c`` is rows ``chunk_offsets[c] : chunk_offsets[c+1]``. A request's own tokens
    start at position ``position_offset`` (prefix: S_total; independent: chunk_size)."""

    manifest: Manifest
    chunk_offsets: torch.Tensor  # [C + 1] int32, on device
    k_pools: list[torch.Tensor]  # per layer [S_total, Hkv, D]
    v_pools: list[torch.Tensor]  # per layer [S_total, Hkv, D]
    routing: list[Any]  # per layer moska.kernels.router.RoutingIndex, on device
    token_ids: torch.Tensor  # [S_total] int32, CPU: the library's tokens (prefix: in order)
    # moska.library.tiers.ChunkTiers when the KV lives in tiers (GPU cache, CPU, disk): then
    # k_pools/v_pools are the GPU slot pools, addressed through tiers.tables (never offsets)
    tiers: Any = None
    # FP8 libraries (manifest.kv_dtype "fp8"): pools are float8_e4m3fn and each KV slot has
    # (k_scale, v_scale) [S_total, Hkv] fp32 rows beside the pools' rows; else None
    kv_scale_pools: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # tensor parallelism: the KV heads [start, stop) of the manifest's that this rank holds
    # (pools, scales and the routing index's per-head parts; load_library(kv_heads=)); None:
    # all of them. head_split (distributed/tp_library.HeadSplit) routes across the ranks.
    kv_heads: tuple[int, int] | None = None
    head_split: Any = None
    # library/arena.py ArenaRange when the pools are views of rows of the engine's one slot
    # space (every resident library of the model in one pool tensor per layer); else None
    arena_range: Any = None
    # library/fp8_mma.py TokenMajorV: FP8 libraries read by the FP8 tensor-core program
    # (--fp8-attention mma): V copied token-major at load; None: the upcast program
    fp8_mma: Any = None
    # [D, D] that readers multiply q by: a rotated FP8 library's (library/fp8_rotated.py)
    q_rotation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        m = self.manifest
        S, C, L = m.num_tokens, m.num_chunks, m.num_kv_layers
        assert self.chunk_offsets.shape == (C + 1,) and self.chunk_offsets.dtype == torch.int32
        assert len(self.k_pools) == len(self.v_pools) == len(self.routing) == L
        hkv = m.model.num_kv_heads if self.kv_heads is None else self.kv_heads[1] - self.kv_heads[0]
        shape = (S, hkv, m.model.head_dim)
        for k, v in zip(self.k_pools, self.v_pools):
            if self.tiers is None:
                assert tuple(k.shape) == shape and tuple(v.shape) == shape, (k.shape, shape)
        assert self.token_ids.shape == (S,)

    @property
    def name(self) -> str:
        return self.manifest.name

    def kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """KV slot ``layer``'s (k_scale, v_scale) [S_total, Hkv] fp32 for e4m3 pools, else None:
        what the grouped kernel's ``kv_scales`` takes."""
        return None if self.kv_scale_pools is None else self.kv_scale_pools[layer]

    @property
    def build_id(self) -> str:
        """Identifies this build of the library (a new one for every build, even under the
        same name): what caches key on. Older manifests get one from their file checksums;
        a library built in memory and never saved without one gets its object id."""
        m = self.manifest
        if m.build_id:
            return m.build_id
        if m.files:
            digest = hashlib.sha256(json.dumps(m.files, sort_keys=True).encode()).hexdigest()
            return f"sha-{digest[:24]}"
        return f"mem-{id(self):x}"

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def position_offset(self) -> int:
        return self.manifest.position_offset

    @property
    def num_chunks(self) -> int:
        return self.manifest.num_chunks

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def num_kv_layers(self) -> int:
        """Layers of KV held (pools are indexed by KV slot; fewer than layers under MLKV)."""
        return self.manifest.num_kv_layers

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    @property
    def chunks(self) -> tuple[ChunkEntry, ...]:
        return self.manifest.chunks

    @property
    def device(self) -> torch.device:
        return self.k_pools[0].device

    def chunk_span(self, chunk: int) -> ChunkSpan:
        """The document (by name; None for manifests without document spans) and token span
        ``[start, end)`` of chunk ``chunk``: what a routing report shows a person."""
        return self.manifest.chunk_span(chunk)

    @property
    def nbytes(self) -> int:
        """Device bytes held: KV pools plus routing indexes."""
        n = sum(t.numel() * t.element_size() for t in (*self.k_pools, *self.v_pools))
        for pair in self.kv_scale_pools or ():
            n += sum(t.numel() * t.element_size() for t in pair)
        for index in self.routing:
            n += sum(t.numel() * t.element_size() for t in index if isinstance(t, torch.Tensor))
        if self.fp8_mma is not None:  # the token-major V copy (library/fp8_mma.py)
            n += self.fp8_mma.nbytes
        return n


def check_fingerprint(manifest: Manifest, fingerprint: ModelFingerprint | None) -> None:
    if fingerprint is None:
        return
    fields = manifest.model.mismatches(fingerprint)
    if fields:
        raise FingerprintMismatchError(
            manifest.name, manifest.model.describe(), fingerprint.describe(), fields
        )


def verify_files(directory: Path, manifest: Manifest, progress: bool = True) -> None:
    """Every file the manifest needs exists inside ``directory`` and matches its sha256,
    else a typed error."""
    from tqdm.auto import tqdm

    paths = library_files(directory, manifest)
    total = sum(p.stat().st_size for p in paths)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"verify {manifest.name}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for p in paths:
            digest = sha256_file(p, bar.update)
            if digest != manifest.files[p.name]:
                raise ChecksumMismatchError(
                    manifest.name,
                    p.name,
                    f"sha256 {digest[:16]}... differs from the manifest's "
                    f"{manifest.files[p.name][:16]}... (truncated or altered)",
                )


# the KV-head axis of each per-head tensor of a layer file (read sliced under kv_heads)
_HEAD_AXIS = {"k": 1, "v": 1, "k_scale": 1, "v_scale": 1, INDEX_PREFIX + "basis": 0}
_HEAD_AXIS.update({INDEX_PREFIX + f: 1 for f in ("mean_keys", "key_min", "key_max")})
_HEAD_AXIS[INDEX_PREFIX + "lowrank_keys"] = 1


def _load_file(
    directory: Path,
    manifest: Manifest,
    fname: str,
    device: torch.device,
    kv_heads: tuple[int, int] | None = None,
) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = directory / validate_file_name(fname)
    try:
        if kv_heads is None:
            return load_file(str(path), device=str(device))
        out = {}  # only this rank's KV heads of each per-head tensor are read
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                axis = _HEAD_AXIS.get(key)
                if axis is None:
                    out[key] = f.get_tensor(key)
                else:
                    heads = (slice(None),) * axis + (slice(*kv_heads),)
                    out[key] = f.get_slice(key)[heads].contiguous()
        return out
    except Exception as e:  # safetensors raises its own error types; keep paths out
        reason = str(e).replace(str(path), fname).replace(str(directory), manifest.name)
        raise CorruptLibraryError(manifest.name, fname, f"unreadable ({reason})") from e


def load_library(
    root: str | os.PathLike,
    name: str,
    model_fingerprint: ModelFingerprint | None,
    device: str | torch.device = "cpu",
    *,
    verify_checksums: bool = True,
    progress: bool = True,
    tiers: Any = None,
    kv_heads: tuple[int, int] | None = None,
    reserve: Callable[[Manifest, Any], Any] | None = None,
) -> LoadedLibrary:
    """Load ``<root>/<name>`` onto ``device``.

    Checks, before anything is built: the manifest parses; the model fingerprint matches
    (``FingerprintMismatchError``; skipped when ``model_fingerprint`` is None); every file
    it lists is a plain name inside the library's folder (nothing outside is opened) and
    exists with its recorded sha256 (``ChecksumMismatchError`` naming the file). Then loads
    layer by layer, checking names, shapes and dtypes (``CorruptLibraryError``).
    ``tiers`` (a ``moska.library.tiers.TierConfig``): when the library's KV exceeds its GPU
    budget, only the routing index is loaded; the KV stays on disk behind the CPU and GPU
    chunk caches (``library.tiers``). ``kv_heads`` (start, stop): read only those KV heads
    of every per-head tensor (a tensor-parallel rank's; not with ``tiers``).
    ``reserve(manifest, layout)``: an ``arena.ArenaRange`` of ``num_tokens`` rows of the
    engine's slot space to load the KV into (layer files read on the CPU, then copied into
    the rows: no transient device copy), or None for pools of its own (the manager's).
    """
    directory = Path(root) / validate_name(name)
    if not directory.is_dir():
        raise LibraryNotFoundError(name, root)
    manifest = read_manifest(directory)
    check_fingerprint(manifest, model_fingerprint)
    if verify_checksums:
        verify_files(directory, manifest, progress)
    else:
        library_files(directory, manifest)  # inside the folder, present

    device = torch.device(device)
    m = manifest.model
    if kv_heads is not None and not 0 <= kv_heads[0] < kv_heads[1] <= m.num_kv_heads:
        raise ValueError(f"kv_heads {kv_heads} is not a range of the {m.num_kv_heads} KV heads")
    if kv_heads is not None and tiers is not None:
        raise ValueError("a library in tiers is loaded whole: pass kv_heads or tiers, not both")
    hkv = m.num_kv_heads if kv_heads is None else kv_heads[1] - kv_heads[0]
    shape = (manifest.num_tokens, hkv, m.head_dim)
    dtype = getattr(torch, m.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptLibraryError(
            name, MANIFEST_FILE, f"model dtype {m.dtype!r} is not a torch dtype"
        )
    fp8 = manifest.kv_dtype == "fp8"
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype  # pools; the routing index stays `dtype`
    offsets = torch.tensor(manifest.chunk_offsets, dtype=torch.int32, device=device)
    tokens = _load_file(directory, manifest, TOKENS_FILE, torch.device("cpu")).get("token_ids")
    if tokens is None or tokens.shape != (manifest.num_tokens,):
        raise CorruptLibraryError(name, TOKENS_FILE, "token_ids missing or of the wrong shape")
    if tiers is not None:  # a TierConfig: KV in tiers unless the library fits its GPU budget
        from moska.library.tiered_load import load_tiered, plan_slots

        slots, cpu_slots = plan_slots(manifest, tiers, device)
        if slots < manifest.num_chunks:
            return load_tiered(
                directory, manifest, offsets, tokens, device, tiers, slots, cpu_slots, reserve
            )
    rng = None
    if reserve is not None and not fp8:
        from moska.library.arena import ArenaLayout

        layout = ArenaLayout(manifest.num_kv_layers, hkv, m.head_dim, dtype, device)
        rng = reserve(manifest, layout)
    try:
        library = _load_layers(
            directory, manifest, offsets, tokens, device, kv_heads, shape, kv_dtype, rng, progress
        )
    except BaseException:
        if rng is not None:
            rng.release()
        raise
    if rng is not None:
        library.arena_range = rng
        rng.attach(library)
    return library


def _load_layers(
    directory: Path,
    manifest: Manifest,
    offsets: torch.Tensor,
    tokens: torch.Tensor,
    device: torch.device,
    kv_heads: tuple[int, int] | None,
    shape: tuple[int, int, int],
    kv_dtype: torch.dtype,
    rng: Any,
    progress: bool,
) -> LoadedLibrary:
    """The layer files' KV and routing indexes, into ``rng``'s rows when given."""
    from tqdm.auto import tqdm

    from moska.kernels.router import RoutingIndex, to_lowrank_dtype
    from moska.library.fp8_rotated import q_rotation_for

    name, fp8 = manifest.name, manifest.kv_dtype == "fp8"
    hkv, dtype = shape[1], getattr(torch, manifest.model.dtype)
    k_pools, v_pools, routing, scales = [], [], [], []
    for i in tqdm(
        range(manifest.num_kv_layers),
        desc=f"load {name}",
        unit="layer",
        disable=not progress,
        dynamic_ncols=True,
    ):
        fname = layer_file(i)
        where = device if rng is None else torch.device("cpu")
        t = _load_file(directory, manifest, fname, where, kv_heads)
        for key in ("k", "v"):
            if key not in t or tuple(t[key].shape) != shape or t[key].dtype != kv_dtype:
                got = (tuple(t[key].shape), t[key].dtype) if key in t else "missing"
                raise CorruptLibraryError(
                    name, fname, f"{key}: expected {shape} {kv_dtype}, got {got}"
                )
        if fp8:
            scales.append(_fp8_scales(t, manifest, fname, hkv))
        fields = {}
        for f in RoutingIndex._fields:
            if f == "chunk_offsets":
                fields[f] = offsets
            elif INDEX_PREFIX + f in t:
                fields[f] = t[INDEX_PREFIX + f]
            else:
                raise CorruptLibraryError(name, fname, f"routing index field {f!r} missing")
        # libraries built before fp16 low-rank keys stored them in the pool dtype
        fields["lowrank_keys"] = to_lowrank_dtype(fields["lowrank_keys"], dtype)
        if rng is not None:  # read on the CPU: into the arena rows, the rest to the device
            fields = {f: x.to(device) for f, x in fields.items()}
            fields["chunk_offsets"] = offsets
            with torch.inference_mode(False), torch.no_grad():  # the arena's are normal tensors
                t["k"] = rng.k(i).copy_(t["k"])
                t["v"] = rng.v(i).copy_(t["v"])
        k_pools.append(t["k"])
        v_pools.append(t["v"])
        routing.append(RoutingIndex(**fields))
    return LoadedLibrary(
        manifest,
        offsets,
        k_pools,
        v_pools,
        routing,
        tokens,
        kv_scale_pools=scales if fp8 else None,
        kv_heads=kv_heads,
        q_rotation=q_rotation_for(manifest, device),
    )


def _fp8_scales(
    t: dict, manifest: Manifest, fname: str, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer file's (k_scale, v_scale) [S_total, Hkv] fp32, checked (CorruptLibraryError)."""
    shape = (manifest.num_tokens, num_kv_heads)
    for key in ("k_scale", "v_scale"):
        x = t.get(key)
        if x is None or tuple(x.shape) != shape or x.dtype != torch.float32:
            got = "missing" if x is None else (tuple(x.shape), x.dtype)
            raise CorruptLibraryError(
                manifest.name, fname, f"{key}: expected {shape} float32, got {got}"
            )
    return t["k_scale"], t["v_scale"]
