"""The reference store: earlier prompts' KV, bounded by bytes, evicted least recently used.

Keys are stored **rotated**, as the paged cache holds them (`rope_shift.py` moves them to
new positions). In an engine a reference's KV is blocks of the paged cache itself
(`sharing.py`: `k`, `v` are the cache's flat views and `slots` says where its tokens are);
standalone (tests, benchmarks) it is a gathered copy. An entry is keyed by its prompt's
token ids (a hash; the ids are kept and compared). Finding an entry by similarity goes
through the LSH index, which the store keeps in step with its entries (an evicted entry
leaves the index).

Why it does not thrash: only prompts computed in full are inserted (a prompt that reused
KV is never stored, so approximate KV never becomes a reference and a stream of near
duplicates of one document adds nothing), and every reuse refreshes its reference's
recency, so the documents queries keep coming back to stay while one-off prompts age out.
A candidate whose token matching falls short (no reuse) is not refreshed: the engine looks
up with `touch=False` and refreshes only the reference a plan reuses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from moska.semshare.lsh import LSHIndex
from moska.semshare.sharing import RefBlocks


def prompt_key(token_ids: torch.Tensor | list[int]) -> str:
    """A stable key of a prompt's token ids."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
    return hashlib.sha1(ids.numpy().tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class Reference:
    """One stored prompt: its tokens, matching features and KV at positions 0..N-1."""

    key: str
    token_ids: torch.Tensor  # [N] int64 (CPU)
    features: torch.Tensor  # [N, F] unit rows (matching.token_features)
    k: torch.Tensor  # [L_kv, N, Hkv, D] rotated at positions 0..N-1 (or the cache, flat)
    v: torch.Tensor  # [L_kv, N, Hkv, D]
    # block-backed (`sharing.py`): [N] int64 cache slots of its tokens in `k`, `v` (the
    # paged cache viewed [L_kv, slots, Hkv, D]) and the blocks held; None: a copy
    slots: torch.Tensor | None = None
    blocks: RefBlocks | None = None

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        rows = self.k.shape[1] if self.slots is None else self.slots.shape[0]
        assert self.features.shape[0] == n and rows == n, (
            n, tuple(self.features.shape), tuple(self.k.shape),
        )  # fmt: skip
        assert self.k.shape == self.v.shape

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices into `k`, `v`'s second dimension of reference positions `positions`."""
        return positions if self.slots is None else self.slots[positions.to(self.slots.device)]

    @property
    def nbytes(self) -> int:
        held = [self.features] if self.blocks is not None else [self.features, self.k, self.v]
        kv = 0 if self.blocks is None else self.blocks.nbytes
        return kv + sum(t.numel() * t.element_size() for t in held)


@dataclass
class StoreStats:
    lookups: int = 0
    hits: int = 0  # lookups that found a candidate scoring >= min_score
    inserts: int = 0
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole store


class ReferenceStore:
    """At most `capacity_bytes` of references (KV + features), LRU."""

    def __init__(self, capacity_bytes: int, lsh: LSHIndex) -> None:
        if capacity_bytes < 1:
            raise ValueError("the reference store needs a positive capacity in bytes")
        self.capacity_bytes = capacity_bytes
        self.lsh = lsh
        self._entries: OrderedDict[str, Reference] = OrderedDict()  # oldest first
        self._bytes = 0
        self.stats = StoreStats()
        self.on_evict: Callable[[Reference], None] | None = None  # told each evicted entry

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Reference | None:
        """The entry under `key`, now the most recently used; None if absent."""
        ref = self._entries.get(key)
        if ref is not None:
            self._entries.move_to_end(key)
        return ref

    def put(self, ref: Reference, sigs: torch.Tensor | None = None) -> bool:
        """Insert (or refresh) `ref`, evicting the least recently used entries until it fits.
        False when it alone is larger than the store (nothing is evicted then). `sigs`: its
        features' LSH signatures when already computed (`LSHIndex.signatures_async`)."""
        if ref.key in self._entries:
            self._entries.move_to_end(ref.key)
            return True
        size = ref.nbytes
        if size > self.capacity_bytes:
            self.stats.rejected += 1
            return False
        while self._bytes + size > self.capacity_bytes:
            self._evict_oldest()
        self._entries[ref.key] = ref
        self._bytes += size
        self.lsh.add(ref.key, ref.features, sigs)
        self.stats.inserts += 1
        return True

    def _evict_oldest(self) -> None:
        self.evict(next(iter(self._entries)))

    def evict(self, key: str) -> None:
        """Remove the entry under `key` (it leaves the index; `on_evict` is told)."""
        old = self._entries.pop(key)
        self._bytes -= old.nbytes
        self.lsh.remove(key)
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(old)

    def lru_entries(self) -> list[Reference]:
        """The entries, the next to be evicted first (no recency change)."""
        return list(self._entries.values())

    def lookup(
        self,
        features: torch.Tensor,
        min_score: float,
        prefetch: Callable[[Reference], object] | None = None,
        touch: bool = True,
    ) -> tuple[Reference, float] | None:
        """The reference sharing the most LSH buckets with a prompt's token features
        [N, F], when at least `min_score` of its tokens collide; it becomes the most
        recently used (`touch`; False: the caller `get`s it once it is reused, so that a
        candidate whose token matching then falls short stays where it was in the LRU
        order). `prefetch(ref)`: called with the likeliest reference before the exact LSH
        scores are computed (`LSHIndex.candidates`; no recency change)."""
        self.stats.lookups += 1
        if not self._entries:
            return None
        early = None
        if prefetch is not None:

            def early(key: Hashable) -> None:
                ref = self._entries.get(str(key))
                if ref is not None:
                    prefetch(ref)

        found = self.lsh.candidates(features, top=1, prefetch=early)
        if not found or found[0][1] < min_score:
            return None
        key, score = found[0]
        ref = self.get(str(key)) if touch else self._entries.get(str(key))
        if ref is None:
            return None
        self.stats.hits += 1
        return ref, score
