"""Starting a cluster on one host: P prefill and D decode instances (`moska serve --role`,
one process each, ranks 0..P-1 and P..P+D-1 of the transfer group) or N colocated `both`
instances, each on its own GPU when several are visible (`gpu_placement.py`), and finding
out what each one is (`GET /pd/info`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moska.pd.gpu_placement import instance_envs
from moska.pd.scheduler import Instance


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_pd(spec: str) -> tuple[int, int]:
    """'P:D' -> (P, D), both at least 1."""
    p, _, d = spec.partition(":")
    if not (p.isdigit() and d.isdigit()) or int(p) < 1 or int(d) < 1:
        raise ValueError(f"--pd must be P:D with P, D >= 1 (e.g. 1:1), got {spec!r}")
    return int(p), int(d)


@dataclass
class Cluster:
    """Instances this process started; `stop()` ends them (by their own pids)."""

    urls: dict[str, str] = field(default_factory=dict)  # name -> base URL
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    visible: dict[str, str | None] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES set

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.processes.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start_cluster(
    num_prefill: int,
    num_decode: int,
    num_both: int = 0,
    *,
    model: str | None = None,
    serve_args: Sequence[str] = (),
    log_dir: str | Path | None = None,
    threads_per_instance: int | None = None,
    startup_timeout_s: float = 300.0,
    gpus: Sequence[int] | None = None,
    gpus_per_instance: int = 1,
) -> Cluster:
    """Start the instances and wait until each answers /pd/info as ready. On a CUDA device
    with several GPUs, instance i (prefill, then decode, then both) gets its own
    `gpus_per_instance` of `gpus` (default all), round-robin (`gpu_placement.plan`)."""
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"moska-pd-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    world = num_prefill + num_decode
    master = f"127.0.0.1:{free_port()}"
    roles = ["prefill"] * num_prefill + ["decode"] * num_decode + ["both"] * num_both
    cluster = Cluster()
    placed = instance_envs(len(roles), serve_args, gpus=gpus, gpus_per_instance=gpus_per_instance)
    env = dict(os.environ)
    if threads_per_instance:
        env["OMP_NUM_THREADS"] = str(threads_per_instance)
        env["MKL_NUM_THREADS"] = str(threads_per_instance)
    try:
        for i, role in enumerate(roles):
            port = free_port()
            name = f"{role}{i if role != 'decode' else i - num_prefill}"
            if role == "both":
                name = f"both{i - world}"
            cmd = [sys.executable, "-m", "moska.cli", "serve", "--port", str(port)]
            cmd += ["--role", role, "--ttft-slo", "none", "--no-demo-library"]
            if model:
                cmd += ["--model", model]
            if role != "both":
                cmd += ["--pd-rank", str(i), "--pd-world", str(world), "--pd-master", master]
            cmd += list(serve_args)
            log = log_dir / f"{name}.log"
            visible = placed[i]
            env_i = env if visible is None else {**env, "CUDA_VISIBLE_DEVICES": visible}
            with open(log, "wb") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env_i)
            cluster.processes[name] = proc
            cluster.urls[name] = f"http://127.0.0.1:{port}"
            cluster.logs[name] = log
            cluster.visible[name] = placed[i]
        wait_ready(cluster, startup_timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_ready(cluster: Cluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = dict(cluster.urls)
    while waiting:
        for name, url in list(waiting.items()):
            proc = cluster.processes.get(name)
            if proc is not None and proc.poll() is not None:
                tail = cluster.logs[name].read_text(errors="replace")[-2000:]
                raise RuntimeError(f"instance {name} exited ({proc.returncode}):\n{tail}")
            try:
                info = httpx.get(f"{url}/pd/info", timeout=2.0).json()
            except (httpx.HTTPError, ValueError):
                continue
            if info.get("error"):
                raise RuntimeError(f"instance {name}: {info['error']}")
            if info.get("ready"):
                del waiting[name]
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances {sorted(waiting)} not ready in {timeout_s:.0f} s")
        time.sleep(0.2)


def discover(urls: dict[str, str], timeout_s: float = 10.0) -> list[Instance]:
    """An Instance per URL, from its /pd/info."""
    out = []
    for name, url in urls.items():
        r = httpx.get(f"{url}/pd/info", timeout=timeout_s)
        if r.status_code != 200:
            raise ValueError(
                f"{url} answered /pd/info with {r.status_code}: start it with `moska serve "
                "--role prefill|decode|both`"
            )
        info = r.json()
        out.append(
            Instance(
                name=name,
                url=url,
                role=info["role"],
                rank=info["rank"],
                block_size=int(info["block_size"]),
                num_blocks=int(info["num_blocks"]),
                max_num_seqs=int(info["max_num_seqs"]),
                max_batched_tokens=int(info.get("max_batched_tokens") or 2048),
            )
        )
    return out
