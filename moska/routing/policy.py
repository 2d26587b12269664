"""How a library's chunks are picked for a request: the routing policy, one frozen value.

The kernels (moska.kernels.router) score chunks and turn top-k indices into Selections; the
policy decides what is scored, which layers route at all and how many chunks a row takes.
Defaults come from the fidelity study (bench/results/fidelity_code_*.json, docs/routing.md):
key-max, per KV head, every layer routed, nothing always read. Each other rule is a knob
that the study measured and did not keep as the default:

- ``scorer``: key-max (one decisive key decides a chunk; the mean buries it).
- ``per_kv_head``: each KV head picks its own k chunks (the default: KV heads look for
  different things; one summed set per request serves the loudest head).
- ``dense_layers``: the first layers read every chunk (0 by default: it did not help).
- ``always_first`` / ``always_last``: the first chunk (attention sinks: the BOS token) and, in
  prefix mode, the chunk nearest the request are always read; they count toward k (off by
  default: at small k they spend the slots that the scorer would have used better).
- ``mass_threshold``: adaptive k: a row takes chunks, best first, until their estimated share
  of the attention mass reaches the threshold, at most k (``top_k_chunks``). Needs a host
  sync per layer (variable-length selections), so such steps run eagerly (no CUDA graph).
- ``shortlist_per_head`` (two_stage; a study knob like ``shortlist_factor``): each KV head
  shortlists ``shortlist_factor * k`` chunks on its own bound and key-max scores only its
  own shortlist (about shortlist / C of the default's key-max work), instead of one
  shortlist per request on the bound summed over heads. Not under tensor parallelism
  (the split router shortlists per request).
- ``page_size``: score pages of this many tokens inside chunks (key-max per page) and rank a
  chunk by the log-sum-exp of its pages' scores (a chunk with several hot pages outranks one
  with a single hot key); selections stay whole chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

# the kernels' scorers (moska.kernels.router.SCORERS; a test keeps the two equal). Spelled
# here so that the config can import this module without torch.
SCORERS = ("keymax", "mean", "bound", "two_stage")
ORACLE = "oracle"  # true per-chunk attention mass: for studies only (an all-chunks pass)
POLICY_SCORERS = (*SCORERS, ORACLE)


class RoutingPolicyError(ValueError):
    """A routing setting out of range; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RoutingPolicy:
    """Which chunks a row of a library request attends to (``top_k_chunks`` is the k)."""

    scorer: str = "keymax"
    per_kv_head: bool = True
    dense_layers: int = 0
    always_first: bool = False
    always_last: bool = False
    mass_threshold: float | None = None
    page_size: int | None = None
    shortlist_factor: int = 4
    shortlist_per_head: bool = False

    def __post_init__(self) -> None:
        if self.scorer not in POLICY_SCORERS:
            raise RoutingPolicyError(
                "scorer", f"scorer must be one of {', '.join(POLICY_SCORERS)}, got {self.scorer!r}"
            )
        if self.dense_layers < 0:
            raise RoutingPolicyError(
                "dense_layers", f"dense_layers must be >= 0, got {self.dense_layers}"
            )
        if self.mass_threshold is not None and not 0.0 < self.mass_threshold <= 1.0:
            raise RoutingPolicyError(
                "mass_threshold",
                f"mass_threshold must be in (0, 1] (or null for a fixed k), "
                f"got {self.mass_threshold}",
            )
        if self.page_size is not None and self.page_size < 1:
            raise RoutingPolicyError(
                "page_size", f"page_size must be a positive token count, got {self.page_size}"
            )
        if self.page_size is not None and self.scorer != "keymax":
            raise RoutingPolicyError(
                "page_size", "page_size scores pages with key-max: use it with scorer 'keymax'"
            )
        if self.shortlist_factor < 1:
            raise RoutingPolicyError(
                "shortlist_factor", f"shortlist_factor must be >= 1, got {self.shortlist_factor}"
            )

    @property
    def graph_safe(self) -> bool:
        """Fixed shapes and no host sync: a decode step with it can replay a CUDA graph."""
        return self.mass_threshold is None and self.page_size is None and self.scorer != ORACLE

    def replace(self, **changes: Any) -> RoutingPolicy:
        return RoutingPolicy(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: RoutingPolicy | None = None) -> RoutingPolicy:
        """``base`` (the defaults) with the fields ``data`` names; unknown names are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RoutingPolicyError(
                unknown[0],
                f"unknown routing field {unknown[0]!r}; known: {', '.join(sorted(names))}",
            )
        return (base or cls()).replace(**dict(data))


LEGACY = RoutingPolicy(per_kv_head=False)
"""The router before this policy existed: one set of chunks per request (KV heads' scores
summed), every layer routed, no always-read chunks."""


def always_chunks(policy: RoutingPolicy, num_chunks: int, mode: str, top_k: int) -> list[int]:
    """The chunk ids every row reads, trimmed to ``top_k`` (they count toward it): the chunk
    nearest the request (prefix mode only) first, then the first chunk."""
    ids: list[int] = []
    if policy.always_last and mode == "prefix":
        ids.append(num_chunks - 1)
    if policy.always_first and 0 not in ids:
        ids.append(0)
    return ids[: max(0, top_k)]


def default_chunk_size(num_tokens: int, chunks: int = 32, lo: int = 64, hi: int = 4096) -> int:
    """A library's chunk size when none is given: the power of two that cuts it into about
    ``chunks`` chunks, within [lo, hi]. A fixed 4,096 made a 4K-token library one chunk
    (nothing to route); 64-token chunks for a million tokens make the router's work large."""
    target = max(1, num_tokens // chunks)
    size = 1 << max(0, round(math.log2(target)))
    return max(lo, min(hi, size))
