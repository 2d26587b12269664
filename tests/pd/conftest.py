"""P/D fixtures: prefill and decode instances in this process (real engines on the built-in
tiny model, sharing its weights; their own KV caches and engine threads), each a moska
server in a uvicorn thread, joined in one gloo transfer group; a front end over them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from moska.pd.cluster import free_port
from moska.server.background import background_server


def make_engine(first=None, **overrides):
    """A tiny-model engine; with `first`, one sharing `first`'s weights (cheap)."""
    from moska.engine.llm_engine import LLMEngine
    from moska.library.manager import LibraryManager

    kw = {"device": "cpu", "max_model_len": 512, "num_kv_blocks": 256, "max_num_seqs": 8}
    kw |= overrides
    if first is None:
        return LLMEngine.from_model(None, **kw)
    engine = LLMEngine(first.config, first.loaded, LibraryManager(
        first.libraries.root, first.loaded, torch.device("cpu")))  # fmt: skip
    engine.model_name = first.model_name
    return engine


def transport_pair(timeout_s: float, transport: str = "auto") -> list:
    """Two KVTransport ranks of one transfer group on this host, connected (each connect
    waits for the other, so they join in threads), rank 1 receiving from rank 0."""
    import threading

    from moska.pd.endpoint import TransferEndpoint
    from moska.pd.transport import KVTransport

    port = free_port()
    eps = [TransferEndpoint("127.0.0.1", port, r, 2, timeout_s, transport) for r in (0, 1)]
    ranks = [KVTransport(ep) for ep in eps]
    joins = [threading.Thread(target=r.connect) for r in ranks]
    for t in joins:
        t.start()
    for t in joins:
        t.join(60)
    ranks[1].start_receiving([0])
    return ranks


@contextlib.contextmanager
def pd_instances(engines_roles, timeout_s: float = 30.0, master_port=None, world=None):
    """Serve each (engine, role) as an instance, ranks in order (`world`: more ranks join
    from elsewhere); yields {name: url} and the apps."""
    from moska.pd.endpoint import TransferEndpoint
    from moska.pd.instance import PDConfig, attach
    from moska.server.app import create_app
    from moska.server.settings import ServerSettings

    port = master_port or free_port()
    world = world or sum(1 for _, role in engines_roles if role != "both")
    apps, names = [], []
    counts: dict[str, int] = {}
    for rank, (engine, role) in enumerate(engines_roles):
        app = create_app(engine, ServerSettings(ttft_slo=None))
        ep = TransferEndpoint("127.0.0.1", port, rank, world, timeout_s=5.0)
        attach(app, PDConfig(role, ep if role != "both" else None))
        apps.append(app)
        names.append(f"{role}{counts.get(role, 0)}")
        counts[role] = counts.get(role, 0) + 1
    with contextlib.ExitStack() as stack:
        urls = {n: stack.enter_context(background_server(a)) for n, a in zip(names, apps)}
        for app in apps:
            if app.state.pd.transport is not None:
                assert app.state.pd.ready.wait(timeout_s), app.state.pd.connect_error
        yield urls, dict(zip(names, apps))
        for app in apps:
            if app.state.pd.transport is not None:
                app.state.pd.transport.close()


def front_end(urls: dict[str, str], slo=None, **config):
    from moska.pd.cluster import discover
    from moska.pd.frontend import FrontEnd, FrontEndConfig
    from moska.pd.scheduler import SLO, GlobalScheduler

    instances = discover(urls)
    sched = GlobalScheduler(instances, slo or SLO())
    return FrontEnd(instances, sched, FrontEndConfig(**config))


@pytest.fixture(scope="session")
def victim(tmp_path_factory):
    """(process, HTTP port, transfer master port) of a decode instance in its own process
    (rank 2 of a world of 3); test_pd_faults kills it, and asks for it before `pd_cluster`
    so that its start overlaps that fixture's when both are new. Only that test starts it
    (~5 s of CPU: a `moska serve` importing torch): under pytest-xdist the P/D tests may be
    split between the workers, and the other worker's cluster has no use for one."""
    port, master_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "moska.cli", "serve", "--role", "decode", "--pd-rank", "2",
           "--pd-world", "3", "--pd-master", f"127.0.0.1:{master_port}", "--port", str(port),
           "--ttft-slo", "none", "--no-demo-library", "--device", "cpu", "--max-model-len",
           "512", "--num-kv-blocks", "256", "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path_factory.mktemp("victim") / "victim.log"
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    yield proc, port, master_port
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="session")
def pd_cluster():
    """(front end URL, {name: url}, {name: app}, FrontEnd): prefill0 (rank 0), decode0 and
    decode1. prefill0 doubles as the colocated reference: a request without the transfer
    header is served whole by it."""
    from moska.pd.frontend_app import create_frontend_app

    first = make_engine()
    engines = [first, make_engine(first), make_engine(first)]
    roles = ["prefill", "decode", "decode"]
    with pd_instances(list(zip(engines, roles))) as (urls, apps):
        front = front_end(urls)
        with background_server(create_frontend_app(front)) as url:
            yield url, urls, apps, front
