"""Representative-key routers as named fidelity policies (issue #17.3, the router's cost).

``rep-<kind><m>`` (e.g. ``rep-page16``, ``rep-norm8``, ``rep-kmeans32``): the default rule
(key-max, per KV head, fixed k) scored on m representative keys per chunk and KV head
(``moska.routing.representatives``) instead of every key. Installed through
``fidelity_hook`` (a hook on ``moska.routing.select_chunks`` keyed by policy identity).
"""

from __future__ import annotations

import functools

from moska.bench import fidelity_hook
from moska.routing import RoutingPolicy
from moska.routing.representatives import RepSpec, select_with_representatives

REP_POLICIES = {
    f"rep-{kind}{m}": RepSpec(kind=kind, m=m)
    for kind in ("norm", "page", "kmeans")
    for m in (8, 16, 32)
}


def _select(q, library, layer, top_k, policy, sm_scale, spec: RepSpec, **kw):
    kw = {k: v for k, v in kw.items() if k in ("use_triton", "keymax_programs")}
    return select_with_representatives(q, library, layer, top_k, policy, spec, **kw)


def rep_policies() -> dict[str, RoutingPolicy]:
    """The representative routers as named policies (fresh objects; `fidelity_hook`)."""
    return fidelity_hook.named_policies(
        {name: functools.partial(_select, spec=spec) for name, spec in REP_POLICIES.items()}
    )
