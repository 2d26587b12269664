"""Representative-key routers as named fidelity policies (issue #17.3, the router's cost).

``rep-<kind><m>`` (e.g. ``rep-page16``, ``rep-norm8``, ``rep-kmeans32``): the default rule
(key-max, per KV head, fixed k) scored on m representative keys per chunk and KV head
(``moska.routing.representatives``) instead of every key. Installed as a hook on
``moska.routing.select_chunks`` keyed by policy identity, like ``fidelity_variants``.
"""

from __future__ import annotations

import moska.routing as routing_pkg
from moska.routing import RoutingPolicy
from moska.routing.representatives import RepSpec, select_with_representatives

REP_POLICIES = {
    f"rep-{kind}{m}": RepSpec(kind=kind, m=m)
    for kind in ("norm", "page", "kmeans")
    for m in (8, 16, 32)
}
_RULES: dict[int, RepSpec] = {}  # id(policy) -> spec
_next_select = routing_pkg.select_chunks


def _select(q, library, layer, top_k, policy, sm_scale, **kw):
    spec = _RULES.get(id(policy))
    if spec is None:
        return _next_select(q, library, layer, top_k, policy, sm_scale, **kw)
    kw = {k: v for k, v in kw.items() if k in ("use_triton", "keymax_programs")}
    return select_with_representatives(q, library, layer, top_k, policy, spec, **kw)


def rep_policies() -> dict[str, RoutingPolicy]:
    """The representative routers as named policies (fresh objects); installs the hook, a
    no-op for every other policy."""
    global _next_select
    if routing_pkg.select_chunks is not _select:
        _next_select, routing_pkg.select_chunks = routing_pkg.select_chunks, _select
    out = {}
    for name, spec in REP_POLICIES.items():
        pol = RoutingPolicy().replace()
        _RULES[id(pol)] = spec
        out[name] = pol
    return out
