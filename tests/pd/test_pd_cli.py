"""`moska router` and `moska serve --role` flags: a front end over running instances,
and the errors a wrong setup gets."""

from __future__ import annotations

import pytest

from moska.cli import build_parser
from moska.pd.cli import build_frontend, pd_config

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def test_router_over_running_instances(pd_cluster):
    _, urls, _, _ = pd_cluster
    argv = ["router", "--prefill", urls["prefill0"], "--decode", urls["decode0"]]
    args = build_parser().parse_args([*argv, "--ttft-slo", "3", "--tpot-slo", "none"])
    front, cluster = build_frontend(args)
    assert cluster is None and front.scheduler.slo.ttft_s == 3.0
    assert front.scheduler.slo.tpot_s is None
    assert sorted(i.role for i in front.instances) == ["decode", "prefill"]
    both = build_parser().parse_args(["router", "--both", urls["prefill0"]])
    with pytest.raises(ValueError, match="prefill and decode instances only"):
        build_frontend(build_parser().parse_args(["router", "--decode", urls["decode0"]]))
    assert both.both == [urls["prefill0"]]


def test_serve_role_flags():
    parse = build_parser().parse_args
    assert pd_config(parse(["serve"])) is None
    with pytest.raises(ValueError, match="--pd-master"):
        pd_config(parse(["serve", "--role", "decode"]))
    cfg = pd_config(parse(["serve", "--role", "prefill", "--pd-master", "127.0.0.1:29500",
                           "--pd-rank", "0", "--pd-world", "2"]))  # fmt: skip
    assert cfg.role == "prefill" and cfg.endpoint.port == 29500 and cfg.endpoint.world_size == 2
    assert cfg.endpoint.transport == "auto"
    cfg = pd_config(parse(["serve", "--role", "decode", "--pd-master", "h:1", "--pd-rank", "1",
                           "--pd-world", "2", "--pd-transport", "gloo"]))  # fmt: skip
    assert cfg.endpoint.transport == "gloo"
    with pytest.raises(ValueError, match="--pd-rank"):
        pd_config(parse(["serve", "--role", "decode", "--pd-master", "h:1", "--pd-rank", "2",
                         "--pd-world", "2"]))  # fmt: skip
    with pytest.raises(ValueError, match="P:D"):
        from moska.pd.cluster import parse_pd

        parse_pd("2")
