"""`moska router`: the front end, over instances it starts (`--pd P:D`, `--colocated N`) or
ones already running (`--prefill URL --decode URL`, `--both URL`)."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys

from moska.pd.endpoint import TRANSPORTS

logger = logging.getLogger(__name__)


def _slo(value: str) -> float | None:
    if value.lower() in ("none", "0"):
        return None
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError("an SLO is positive seconds, or none")
    return v


def add_router_parser(sub) -> None:
    r = sub.add_parser(
        "router",
        help="OpenAI front end over prefill/decode instances (Mooncake-style disaggregation)",
    )
    r.add_argument("--pd", default=None, help="start P prefill and D decode instances: P:D")
    r.add_argument("--colocated", type=int, default=0, help="start N --role both instances "
                   "behind round-robin (the baseline)")  # fmt: skip
    r.add_argument("--prefill", action="append", default=[], help="URL of a prefill instance")
    r.add_argument("--decode", action="append", default=[], help="URL of a decode instance")
    r.add_argument("--both", action="append", default=[], help="URL of a colocated instance")
    r.add_argument("--model", default=None, help="model of the instances it starts")
    r.add_argument("--instance-args", default="", help="more `moska serve` flags, one string")
    r.add_argument("--gpus", default=None, help="GPUs to place the instances on, e.g. 0,1 "
                   "(default: all visible; one per instance, round-robin)")  # fmt: skip
    r.add_argument("--gpus-per-instance", type=int, default=1,
                   help="GPUs each started instance gets (0: all share, as on one GPU)")  # fmt: skip
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--ttft-slo", type=_slo, default=None, help="seconds, or none")
    r.add_argument("--tpot-slo", type=_slo, default=None, help="seconds per token, or none")
    r.add_argument("--transfer-timeout", type=float, default=10.0)
    r.add_argument("--prefill-width", type=int, default=1,
                   help="prefills sent to a prefill instance at once, in admission order "
                   "(0: all at once, the instance batches them)")  # fmt: skip
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_frontend(args: argparse.Namespace):
    """(FrontEnd, Cluster or None) from the parsed flags."""
    from moska.pd.cluster import discover, parse_pd, start_cluster
    from moska.pd.frontend import FrontEnd, FrontEndConfig
    from moska.pd.scheduler import SLO, GlobalScheduler

    cluster = None
    urls: dict[str, str] = {}
    if args.pd or args.colocated:
        p, d = parse_pd(args.pd) if args.pd else (0, 0)
        from moska.pd.gpu_placement import parse_gpus

        cluster = start_cluster(
            p, d, args.colocated, model=args.model, serve_args=shlex.split(args.instance_args),
            gpus=parse_gpus(args.gpus), gpus_per_instance=args.gpus_per_instance,
        )  # fmt: skip
        urls = dict(cluster.urls)
    urls |= {f"prefill-{i}": u for i, u in enumerate(args.prefill)}
    urls |= {f"decode-{i}": u for i, u in enumerate(args.decode)}
    urls |= {f"both-{i}": u for i, u in enumerate(args.both)}
    if not urls:
        raise ValueError("give --pd P:D, --colocated N, or instance URLs (--prefill/--decode)")
    try:
        instances = discover(urls)
        roles = {i.role for i in instances}
        config = FrontEndConfig(transfer_timeout_s=args.transfer_timeout,
                                prefill_width=args.prefill_width)  # fmt: skip
        procs = cluster.processes if cluster else {}
        if roles == {"both"}:
            return FrontEnd(instances, None, config, procs), cluster
        if not roles >= {"prefill", "decode"} or "both" in roles:
            raise ValueError(
                "a P/D front end needs prefill and decode instances only (got roles "
                f"{sorted(roles)}); run colocated instances behind their own router"
            )
        sched = GlobalScheduler(instances, SLO(args.ttft_slo, args.tpot_slo))
        return FrontEnd(instances, sched, config, procs), cluster
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from moska.pd.frontend_app import create_frontend_app

    front, cluster = build_frontend(args)
    # uvicorn re-raises SIGTERM after its shutdown; as SystemExit it still runs the
    # `finally` below, which stops the instances this router started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        logger.info(
            "router on http://%s:%d over %s", args.host, args.port,
            ", ".join(f"{i.name} ({i.role}) {i.url}" for i in front.instances),
        )  # fmt: skip
        uvicorn.run(create_frontend_app(front), host=args.host, port=args.port,
                    log_level=args.log_level)  # fmt: skip
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


def add_role_args(s) -> None:
    """`moska serve` flags of an instance in a prefill/decode cluster."""
    s.add_argument(
        "--role",
        default=None,
        choices=["both", "prefill", "decode"],
        help="prefill: compute prompts' KV and send it to a decode instance; decode: take "
        "sent KV and generate; both: a whole instance behind a router (default: plain server)",
    )
    s.add_argument("--pd-master", default=None, help="HOST:PORT where the transfer group meets")
    s.add_argument("--pd-rank", type=int, default=None, help="this instance's transfer rank")
    s.add_argument("--pd-world", type=int, default=None, help="prefill + decode instances")
    s.add_argument("--pd-transport", default="auto", choices=TRANSPORTS,
                   help="how KV goes to a decode instance: auto takes CUDA IPC (same GPU node) or "
                   "shared memory when the decode instance is on this host, else gloo")  # fmt: skip
    s.add_argument(
        "--kv-pool-dir",
        default=None,
        help="a host KV pool shared by this host's instances (e.g. /dev/shm/moska-kv): "
        "prompts' blocks go there and are taken from there by block hash (needs --role)",
    )
    s.add_argument("--kv-pool-blocks", type=int, default=4096, help="blocks the pool keeps")
    s.add_argument("--kv-pool-disk-dir", default=None, help="a disk tier behind the KV pool: "
                   "blocks leaving the host pool go there, fetched back with the same check")  # fmt: skip
    s.add_argument("--no-pd-overlap", dest="pd_overlap", action="store_false",
                   help="prefill: send the prompt's KV after the prefill ended, not layer by "
                   "layer while it computes")  # fmt: skip


def pd_config(args: argparse.Namespace):
    """The instance's PDConfig, or None for a plain server."""
    if getattr(args, "role", None) is None:
        return None
    from moska.pd.endpoint import TransferEndpoint
    from moska.pd.instance import PDConfig

    endpoint = None
    if args.role != "both":
        if args.pd_master is None or args.pd_rank is None or args.pd_world is None:
            raise ValueError(
                f"--role {args.role} needs --pd-master, --pd-rank and --pd-world (or let "
                "`moska router --pd P:D` start the instances)"
            )
        endpoint = TransferEndpoint.parse(
            args.pd_master, args.pd_rank, args.pd_world,
            transport=getattr(args, "pd_transport", "auto"),
        )  # fmt: skip
    overlap = getattr(args, "pd_overlap", True)
    return PDConfig(args.role, endpoint, args.kv_pool_dir, args.kv_pool_blocks, overlap=overlap,
                    kv_pool_disk_dir=getattr(args, "kv_pool_disk_dir", None))  # fmt: skip
