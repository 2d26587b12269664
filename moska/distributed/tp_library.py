"""Libraries (shared KV) under tensor parallelism: each rank holds its KV heads of each one.

A rank's attention reads only its KV heads, so of a library it needs only those: the KV
pools, FP8 scales and the routing index's per-head parts (mean/min/max keys, basis,
low-rank keys) of the KV heads of its slice (`ShardPlan.kv_heads`; a KV head is replicated
on the ranks that share it when there are more ranks than KV heads). Every rank reads its
heads from the library store itself (`load_library(kv_heads=)`, sliced while reading):
rank 0's manager loads its own, and on a request's `acquire` tells the others to load the
same build (step channel LOAD_LIBRARY, answered by every rank: loaded or why not) and,
once no request holds a build and the manager has dropped it, to drop it (UNLOAD). A
library that exists only in memory (never saved) cannot reach the other ranks: refused.

Routing: a rank scores chunks for its KV heads. With the per-KV-head policy (the default)
and a whole KV head per rank, its heads' picks are exactly TP = 1's and no rank talks. A
policy that sums scores over KV heads (fixed k) sums its heads' scores and all-reduces the
partial sums, [B, C] fp32 per routed layer: every rank ranks the same sums (TP = 1's up to
the order of the additions). Otherwise — the two-stage scorer (its shortlist sums bound
scores over heads), adaptive k or pages with summed heads, or a KV head replicated on ranks
that each hold part of its query heads (a head's score is the max over all its query
heads) — the ranks exchange their per-head scores, an all-reduce MAX of [B, Hkv, C] fp32
(two for two-stage), and every rank ranks exactly TP = 1's scores (`HeadSplit.select`,
which `moska.routing.select.select_chunks` calls for a library that carries one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moska.distributed.comm import Collectives
from moska.distributed.errors import TensorParallelBuildError, TensorParallelConfigError
from moska.library.loaded import LoadedLibrary, load_library
from moska.library.manager import LibraryManager

logger = logging.getLogger(__name__)


class InMemoryLibraryError(TensorParallelConfigError):
    """A library held only in this process's memory (never saved to the store, or loaded
    around the manager), which the other tensor-parallel ranks cannot load."""


class WorkerLibraryError(RuntimeError):
    """A rank other than 0 could not load a library rank 0 loaded."""


@dataclass(frozen=True)
class HeadSplit:
    """This rank's KV heads [start, stop) of `full`, and the routing exchange over `comm`."""

    start: int
    stop: int
    full: int
    replicated: bool  # more ranks than KV heads: a head's query heads span several ranks
    comm: Collectives

    @classmethod
    def of(cls, model: Any) -> HeadSplit:
        """The split of a TensorParallelCausalLM's rank."""
        start, stop = model.plan.kv_heads
        full = model.full_config.num_kv_heads
        return cls(start, stop, full, model.plan.size > full, model.comm)

    @property
    def heads(self) -> tuple[int, int]:
        return (self.start, self.stop)

    @property
    def local(self) -> int:
        return self.stop - self.start

    def needs_exchange(self, policy: Any) -> bool:
        """Whether routing under `policy` needs the other ranks' scores (the same answer on
        every rank: each calls the all-reduce or none does)."""
        return self.replicated or not policy.per_kv_head or policy.scorer == "two_stage"

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[B, h_local, C] per-KV-head scores -> [B, Hkv, C], every rank's heads, by one
        all-reduce MAX (a replicated head: the max over its query heads, as TP = 1)."""
        b, _, c = local.shape
        full = torch.full(
            (b, self.full, c), float("-inf"), dtype=torch.float32, device=local.device
        )
        full[:, self.start : self.stop] = local
        return self.comm.all_reduce(full, op=dist.ReduceOp.MAX)

    def select(
        self,
        q: torch.Tensor,  # [B, Hq_local, D]
        library: Any,
        layer: int,
        top_k: int,
        policy: Any,
        sm_scale: float,
        *,
        use_triton: bool = True,
        keymax_programs: int | None = None,
    ):
        """`select_chunks` for this rank's KV heads, with the scores exchanged: the same
        rules as `kernels.router.route` (fixed k) and `routing.select.choose` (adaptive k,
        pages, the oracle) applied to the whole model's per-head scores."""
        from moska.kernels.router import _always_mask, score_chunks
        from moska.kernels.selections import from_topk
        from moska.routing.policy import ORACLE, always_chunks
        from moska.routing.select import choose, from_mask, log_mass

        index = library.routing[layer]
        B, C, dev = q.shape[0], index.num_chunks, q.device
        always = always_chunks(policy, C, getattr(library, "mode", "prefix"), top_k)
        if policy.mass_threshold is None and policy.page_size is None and policy.scorer != ORACLE:
            always_mask = _always_mask(always or None, B, C, top_k, dev)
            if policy.scorer == "two_stage":
                scores = self._two_stage(
                    q, index, top_k, policy.shortlist_factor, always_mask, use_triton,
                    keymax_programs,
                )  # fmt: skip
            elif not policy.per_kv_head and not self.replicated:  # whole heads: sum partials
                local = score_chunks(q, index, policy.scorer, keymax_programs, use_triton)
                scores = self.comm.all_reduce(local.sum(dim=1, keepdim=True))  # [B, 1, C]
            else:
                local = score_chunks(q, index, policy.scorer, keymax_programs, use_triton)
                scores = self.gather(local)
            if not policy.per_kv_head and scores.shape[1] != 1:
                scores = scores.sum(dim=1, keepdim=True)  # [B, 1, C]
            if always_mask is not None:
                scores = scores.masked_fill(always_mask[:, None, :], float("inf"))
            top = scores.topk(top_k, dim=-1).indices
            if policy.per_kv_head:
                top = top[:, self.start : self.stop]
            return from_topk(top, self.local, C, use_triton)
        if self.replicated and (policy.scorer == ORACLE or policy.page_size is not None):
            raise TensorParallelConfigError(
                "the oracle scorer and page_size sum over a KV head's query heads, which "
                f"tensor_parallel_size {self.comm.world_size} splits over ranks ({self.full} "
                "KV heads); use at most as many ranks as KV heads for them"
            )
        if policy.scorer == "two_stage":
            s = self._two_stage(
                q, index, top_k, policy.shortlist_factor, None, use_triton, keymax_programs
            )
            logmass = s * sm_scale
        else:
            logmass = self.gather(log_mass(q, library, layer, top_k, policy, sm_scale, use_triton))
        mask = choose(logmass, top_k, always, policy.per_kv_head, policy.mass_threshold)
        if policy.per_kv_head:
            mask = mask[:, self.start : self.stop]
        return from_mask(mask, self.local)

    def _two_stage(self, q, index, top_k, factor, always_mask, use_triton, programs):
        """`kernels.router._two_stage_scores` with both stages' scores exchanged."""
        from moska.kernels.router import _keymax_pairs, score_chunks
        from moska.kernels.selections import from_topk

        B, C = q.shape[0], index.num_chunks
        cheap = self.gather(score_chunks(q, index, "bound", use_triton=use_triton)).sum(dim=1)
        if always_mask is not None:
            cheap = cheap.masked_fill(always_mask, float("inf"))
        short = cheap.topk(min(C, factor * top_k), dim=-1).indices  # [B, n_short]
        pairs = from_topk(short[:, None, :], 1, C, use_triton)
        scores = _keymax_pairs(q, index, pairs.req, pairs.chunk, programs, use_triton)
        table = torch.full((B, C, self.local), float("-inf"), dtype=torch.float32, device=q.device)
        table[pairs.req.long(), pairs.chunk.long()] = scores
        return self.gather(table.permute(0, 2, 1))


def in_memory_reason(library: LoadedLibrary, split: HeadSplit | None) -> str | None:
    """Why `library` cannot be shared with the other ranks (None: it can)."""
    m = library.manifest
    if not m.files:
        return "it was built in memory and never saved"
    if split is not None and library.kv_heads != split.heads:  # None: shared-KV ranks
        return "it was loaded outside the engine's library manager (all KV heads)"
    return None


class TensorParallelLibraries(LibraryManager):
    """Rank 0's LibraryManager under tensor parallelism: loads its KV heads only, keeps the
    other ranks holding the builds that requests read, refuses builds (they run the model
    outside the engine's steps) and libraries that exist only in memory."""

    def __init__(self, root, loaded_model, device, channel, **kwargs) -> None:
        kwargs.pop("tiers", None)  # tiers load a library whole: refused in from_model
        super().__init__(root, loaded_model, device, **kwargs)
        self.channel = channel  # StepChannel
        # None in SharedKVLibraries: its ranks hold whole KV heads
        self.split: HeadSplit | None = HeadSplit.of(loaded_model.model)
        self.load_options = {"kv_heads": self.split.heads}

    def reserve(self, name: str) -> Any:
        """Refused before a build job is queued (the HTTP route reserves first: a 400)."""
        raise TensorParallelBuildError(name)

    def build(self, name: str, *args: Any, reservation: Any = None, **kwargs: Any):
        if reservation is not None:
            reservation.release()
        raise TensorParallelBuildError(name)

    def _register(self, name: str, library: LoadedLibrary) -> None:
        if self.split is not None and library.kv_heads == self.split.heads:
            library.head_split = self.split
        super()._register(name, library)

    def acquire(self, name: str) -> LoadedLibrary:
        library = super().acquire(name)
        try:
            reason = in_memory_reason(library, self.split)
            if reason is not None:
                raise InMemoryLibraryError(
                    f"library {name!r} exists only in this process's memory ({reason}); "
                    "with tensor parallelism every rank loads a library from the store: "
                    f"save it under the library root and request it again, or serve with "
                    "tensor_parallel_size=1"
                )
            self.sync_workers()
            if library.build_id not in self.channel.worker_builds:
                self.channel.send_load_library(str(self.root), name, library.build_id)
        except BaseException:
            super().release(library)
            raise
        return library

    def release(self, library: LoadedLibrary) -> None:
        super().release(library)
        self.sync_workers()

    def sync_workers(self) -> None:
        """Tell the other ranks to drop the builds nobody reads any more: neither loaded
        here under a name nor held by a request. Called from the engine's thread only (the
        step channel's commands must not interleave with a step's)."""
        with self._lock:
            live = {lib.build_id for lib in self._loaded.values()} | set(self._refs)
        for build_id in [b for b in self.channel.worker_builds if b not in live]:
            self.channel.send_unload_library(build_id)


class WorkerLibraries:
    """A rank other than 0: the builds rank 0 told it to hold, by build id."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.split = HeadSplit.of(model)
        self.device = device
        self.builds: dict[str, LoadedLibrary] = {}

    def load(self, root: str, name: str, build_id: str) -> str | None:
        """Load `name`'s build `build_id` (its KV heads); None, or why it failed."""
        if build_id in self.builds:
            return None
        try:
            # rank 0 checked the fingerprint and every file's checksum of this build
            library = load_library(
                root, name, None, self.device, verify_checksums=False, progress=False,
                kv_heads=self.split.heads,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
            logger.warning("loading library %s failed: %s", name, e)
            return f"{type(e).__name__}: {e}"
        if library.build_id != build_id:
            return (
                f"the store holds build {library.build_id} of {name!r}, rank 0 loaded "
                f"{build_id} (rebuilt meanwhile): request it again"
            )
        library.head_split = self.split
        self.builds[build_id] = library
        return None

    def unload(self, build_id: str) -> None:
        self.builds.pop(build_id, None)

    def get(self, build_id: str) -> LoadedLibrary:
        return self.builds[build_id]


def make_library_manager(config: Any, loaded: Any, runtime: Any) -> TensorParallelLibraries:
    """Rank 0's library manager of a tensor-parallel engine (LLMEngine.from_model)."""
    from moska.library.manager import default_library_root

    root = config.library_root or default_library_root()
    device = next(loaded.model.parameters()).device
    if runtime.shared_kv is not None:  # libraries' chunks on shared-KV ranks
        from moska.distributed.tp_shared_kv import TensorParallelSharedKVLibraries

        return TensorParallelSharedKVLibraries(
            root, loaded, device, runtime.channel, runtime.shared_kv
        )
    return TensorParallelLibraries(root, loaded, device, runtime.channel)
