"""The transfer group's address and flags (`moska.pd.endpoint`): parsed and validated
before any model loads, with messages naming the flag to fix."""

import pytest

from moska.pd.endpoint import TRANSPORTS, TransferEndpoint


def test_parse_splits_host_and_port_at_the_last_colon():
    ep = TransferEndpoint.parse("[::1]:29501", 1, 3, timeout_s=2.5, transport="shm")
    assert (ep.host, ep.port, ep.rank, ep.world_size) == ("[::1]", 29501, 1, 3)
    assert (ep.timeout_s, ep.transport) == (2.5, "shm")


@pytest.mark.parametrize("master", ["29501", "host:", ":29501", "host:port"])
def test_parse_refuses_a_master_that_is_not_host_port(master):
    with pytest.raises(ValueError, match="--pd-master must be HOST:PORT"):
        TransferEndpoint.parse(master, 0, 2)


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (0, 0)])
def test_rank_outside_the_world_is_refused(rank, world):
    with pytest.raises(ValueError, match="--pd-rank"):
        TransferEndpoint("h", 1, rank, world)


def test_timeout_and_transport_are_checked():
    with pytest.raises(ValueError, match="timeout must be positive"):
        TransferEndpoint("h", 1, 0, 2, timeout_s=0.0)
    with pytest.raises(ValueError, match="--pd-transport must be one of"):
        TransferEndpoint("h", 1, 0, 2, transport="nccl")
    assert {TransferEndpoint("h", 1, 0, 2, transport=t).transport for t in TRANSPORTS} == set(
        TRANSPORTS
    )


def test_the_cli_offers_exactly_the_transports_the_endpoint_takes():
    import argparse

    from moska.pd.cli import add_role_args

    ap = argparse.ArgumentParser()
    add_role_args(ap)
    (action,) = [a for a in ap._actions if a.dest == "pd_transport"]
    assert tuple(action.choices) == TRANSPORTS
