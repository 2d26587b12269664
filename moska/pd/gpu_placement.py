"""Which GPUs each instance of a one-host cluster gets (`moska router --pd`, `moska bench
trace`): with a CUDA device (`--device auto|cuda`) and more than one GPU visible, instance i
gets its own GPU, round-robin, instead of every instance sharing GPU 0.

An instance is placed through its CUDA_VISIBLE_DEVICES, not `--device cuda:i`: its own
GPU(s) come first (so its `cuda` / `cuda:0` is its own GPU and everything the engine puts
on the current device, Triton launches and CUDA graphs included, lands there) and the
host's other GPUs follow (so a decode instance can still open the prefill instance's CUDA
IPC ring on the peer GPU: `pd/ring.py` copies out of it peer to peer). A parent
CUDA_VISIBLE_DEVICES is respected: placement indexes into it.

`--gpus-per-instance 0` keeps the old sharing (every instance on the parent's visible GPUs,
in their order); `--gpus 0,0` lists the GPUs to place on (repeats allowed: two instances on
GPU 0), in the parent's numbering.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


class PlacementError(ValueError):
    """The asked-for placement cannot be made on this host's GPUs."""


def visible_gpu_count() -> int:
    """CUDA devices this process sees (0 without CUDA); the tests replace it."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" to the launcher
        return 0


def device_of(serve_args: Sequence[str]) -> str:
    """The `--device` among `moska serve` flags (auto when absent)."""
    args = list(serve_args)
    for i, a in enumerate(args):
        if a == "--device" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "auto"


def parse_gpus(spec: str | None) -> list[int] | None:
    """'0,1' -> [0, 1]; None or '' -> None (all visible GPUs)."""
    if not spec:
        return None
    try:
        out = [int(x) for x in spec.split(",")]
    except ValueError:
        raise PlacementError(f"--gpus must be GPU numbers like 0,1, got {spec!r}") from None
    if any(g < 0 for g in out):
        raise PlacementError(f"--gpus must be GPU numbers >= 0, got {spec!r}")
    return out


def plan(
    num_instances: int,
    device: str,
    *,
    gpu_count: int,
    gpus: Sequence[int] | None = None,
    gpus_per_instance: int = 1,
    parent_visible: str | None = None,
) -> list[str | None]:
    """Per instance, the CUDA_VISIBLE_DEVICES to start it with (None: leave it as is).

    Placement applies when `device` is auto or cuda (an explicit cuda:N, or cpu, means the
    caller chose) and either several GPUs are visible or `gpus` names some. Instance i gets
    `gpus_per_instance` GPUs from `gpus` (default: all visible), round-robin, then the rest
    of the visible ones."""
    if gpus_per_instance < 0:
        raise PlacementError("--gpus-per-instance must be >= 0 (0: every instance shares)")
    if device not in ("auto", "cuda") or gpus_per_instance == 0:
        return [None] * num_instances
    if gpu_count == 0 or (gpu_count == 1 and gpus is None):
        return [None] * num_instances  # nothing to place: the one GPU (or CPU) as before
    pool = list(range(gpu_count)) if gpus is None else list(gpus)
    bad = [g for g in pool if g >= gpu_count]
    if bad:
        raise PlacementError(
            f"--gpus names GPU {bad[0]} but {gpu_count} are visible here (0..{gpu_count - 1})"
        )
    if not pool:
        raise PlacementError("--gpus lists no GPU")
    if gpus_per_instance > len(pool):
        raise PlacementError(
            f"--gpus-per-instance {gpus_per_instance} is more than the {len(pool)} GPUs to "
            "place on; lower it or list more with --gpus"
        )
    names = _names(parent_visible, gpu_count)
    out: list[str | None] = []
    for i in range(num_instances):
        start = i * gpus_per_instance
        own = [pool[(start + k) % len(pool)] for k in range(gpus_per_instance)]
        order = list(dict.fromkeys(own + [g for g in range(gpu_count) if g not in own]))
        out.append(",".join(names[g] for g in order))
    return out


def _names(parent_visible: str | None, gpu_count: int) -> list[str]:
    """The names to write in a child's CUDA_VISIBLE_DEVICES for GPUs 0..gpu_count-1 of this
    process (its own CUDA_VISIBLE_DEVICES entries, or plain numbers)."""
    if parent_visible is None or not parent_visible.strip():
        return [str(g) for g in range(gpu_count)]
    names = [x.strip() for x in parent_visible.split(",") if x.strip()]
    if len(names) < gpu_count:
        raise PlacementError(
            f"CUDA_VISIBLE_DEVICES={parent_visible!r} names fewer GPUs than the {gpu_count} "
            "torch sees"
        )
    return names[:gpu_count]


def instance_envs(
    num_instances: int,
    serve_args: Sequence[str],
    *,
    gpus: Sequence[int] | None = None,
    gpus_per_instance: int = 1,
    environ: Mapping[str, str] | None = None,
) -> list[str | None]:
    """`plan` for a cluster started with `serve_args`, on this host's GPUs."""
    environ = os.environ if environ is None else environ
    device = device_of(serve_args)
    if device == "cpu" or device.startswith("cuda:") or gpus_per_instance == 0:
        return [None] * num_instances  # no need to ask torch (and start CUDA) at all
    return plan(
        num_instances, device, gpu_count=visible_gpu_count(), gpus=gpus,
        gpus_per_instance=gpus_per_instance, parent_visible=environ.get("CUDA_VISIBLE_DEVICES"),
    )  # fmt: skip
