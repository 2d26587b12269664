"""Routing policy: which shared-library chunks a request reads (the kernels score them)."""

from moska.routing.policy import (
    LEGACY,
    ORACLE,
    POLICY_SCORERS,
    RoutingPolicy,
    RoutingPolicyError,
    always_chunks,
)
from moska.routing.select import choose, from_mask, log_mass, select_chunks

__all__ = [
    "LEGACY",
    "ORACLE",
    "POLICY_SCORERS",
    "RoutingPolicy",
    "RoutingPolicyError",
    "always_chunks",
    "choose",
    "from_mask",
    "log_mass",
    "select_chunks",
]
