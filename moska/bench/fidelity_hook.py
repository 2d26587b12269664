"""One hook on ``moska.routing.select_chunks`` for the fidelity study's routers that no
RoutingPolicy field expresses (``fidelity_variants``, ``fidelity_repkeys``): each is a fresh
policy object, registered by identity with the function that selects for it; every other
policy goes on to the router the hook replaced (the engine's, or another hook's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import moska.routing as routing_pkg
from moska.routing import RoutingPolicy

Select = Callable[..., Any]  # select_chunks(q, library, layer, top_k, policy, sm_scale, **kw)
_ROUTES: dict[int, Select] = {}  # id(policy) -> its selector
next_select: Select = routing_pkg.select_chunks  # what the hook defers to


def study_select(q, library, layer, top_k, policy, sm_scale, **kw):
    """The hook: a registered policy's own selector, else the router it replaced."""
    route = _ROUTES.get(id(policy))
    if route is None:
        return next_select(q, library, layer, top_k, policy, sm_scale, **kw)
    return route(q, library, layer, top_k, policy, sm_scale, **kw)


def named_policies(routes: Mapping[str, Select]) -> dict[str, RoutingPolicy]:
    """A fresh policy per name (rules are keyed by identity), each routed by its selector;
    installs the hook once (attention/shared.py reads select_chunks per call)."""
    global next_select
    if routing_pkg.select_chunks is not study_select:
        next_select, routing_pkg.select_chunks = routing_pkg.select_chunks, study_select
    out = {}
    for name, route in routes.items():
        pol = RoutingPolicy().replace()
        _ROUTES[id(pol)] = route
        out[name] = pol
    return out
