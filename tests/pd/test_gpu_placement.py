"""Which GPU each instance of a one-host cluster gets (moska/pd/gpu_placement.py), with the
device count mocked (no GPU here), and that start_cluster hands each child its placement."""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest

from moska.pd import cluster as cluster_mod
from moska.pd import gpu_placement as gp


def test_round_robin_own_gpu_first_then_peers():
    assert gp.plan(2, "cuda", gpu_count=2) == ["0,1", "1,0"]
    assert gp.plan(3, "auto", gpu_count=2) == ["0,1", "1,0", "0,1"]
    assert gp.plan(4, "cuda", gpu_count=4)[2] == "2,0,1,3"


def test_no_placement_on_cpu_one_gpu_explicit_device_or_sharing():
    assert gp.plan(2, "cpu", gpu_count=2) == [None, None]
    assert gp.plan(2, "cuda", gpu_count=1) == [None, None]
    assert gp.plan(2, "auto", gpu_count=0) == [None, None]
    assert gp.plan(2, "cuda:1", gpu_count=2) == [None, None]
    assert gp.plan(2, "cuda", gpu_count=2, gpus_per_instance=0) == [None, None]


def test_gpu_list_override_and_per_instance_groups():
    assert gp.plan(2, "cuda", gpu_count=2, gpus=[0, 0]) == ["0,1", "0,1"]
    assert gp.plan(2, "cuda", gpu_count=4, gpus=[3, 1]) == ["3,0,1,2", "1,0,2,3"]
    assert gp.plan(2, "cuda", gpu_count=4, gpus_per_instance=2) == ["0,1,2,3", "2,3,0,1"]
    # a list on a one-GPU host is still honoured (all on GPU 0)
    assert gp.plan(2, "cuda", gpu_count=1, gpus=[0]) == ["0", "0"]


def test_parent_visible_devices_are_respected():
    assert gp.plan(2, "cuda", gpu_count=2, parent_visible="5,7") == ["5,7", "7,5"]
    assert gp.plan(1, "cuda", gpu_count=2, parent_visible="GPU-a,GPU-b", gpus=[1]) == [
        "GPU-b,GPU-a"
    ]
    with pytest.raises(gp.PlacementError, match="names fewer GPUs"):
        gp.plan(1, "cuda", gpu_count=3, parent_visible="0,1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gpus": [2]}, "names GPU 2 but 2 are visible"),
        ({"gpus_per_instance": 3}, "more than the 2 GPUs"),
        ({"gpus_per_instance": -1}, ">= 0"),
        ({"gpus": []}, "lists no GPU"),
    ],
)
def test_impossible_placements_say_what_to_do(kwargs, match):
    with pytest.raises(gp.PlacementError, match=match):
        gp.plan(2, "cuda", gpu_count=2, **kwargs)


def test_parse_gpus_and_device_of():
    assert gp.parse_gpus("0,1") == [0, 1]
    assert gp.parse_gpus(None) is None and gp.parse_gpus("") is None
    with pytest.raises(gp.PlacementError, match="--gpus"):
        gp.parse_gpus("0,x")
    assert gp.device_of(["--max-model-len", "9", "--device", "cuda"]) == "cuda"
    assert gp.device_of(["--device=cpu"]) == "cpu"
    assert gp.device_of([]) == "auto"


def test_instance_envs_asks_torch_only_when_placement_may_apply(monkeypatch):
    calls = []

    def count() -> int:
        calls.append(1)
        return 2

    monkeypatch.setattr(gp, "visible_gpu_count", count)
    assert gp.instance_envs(2, ["--device", "cpu"], environ={}) == [None, None]
    assert gp.instance_envs(2, ["--device", "cuda:0"], environ={}) == [None, None]
    assert not calls
    assert gp.instance_envs(2, [], environ={}) == ["0,1", "1,0"]
    visible = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert gp.instance_envs(2, [], environ=visible) == ["2,3", "3,2"]


class _Proc:
    """Stands in for a started instance (records its environment, never runs)."""

    started: ClassVar[list[dict]] = []

    def __init__(self, cmd, stdout=None, stderr=None, env=None) -> None:
        self.cmd, self.env, self.returncode = cmd, env, None
        _Proc.started.append({"cmd": cmd, "env": env})

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        self.returncode = 0

    def wait(self, timeout=None) -> int:
        return 0


def test_start_cluster_gives_each_instance_its_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(gp, "visible_gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cluster_mod.subprocess, "Popen", _Proc)
    monkeypatch.setattr(cluster_mod, "wait_ready", lambda c, t: None)
    _Proc.started = []
    c = cluster_mod.start_cluster(1, 1, serve_args=["--device", "cuda"], log_dir=tmp_path)
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in _Proc.started] == ["0,1", "1,0"]
    assert c.visible == {"prefill0": "0,1", "decode0": "1,0"}
    assert all(s["cmd"][:3] == [sys.executable, "-m", "moska.cli"] for s in _Proc.started)
    _Proc.started = []
    cluster_mod.start_cluster(0, 0, 2, serve_args=["--device", "cuda"], log_dir=tmp_path,
                              gpus_per_instance=0)  # fmt: skip
    assert ["CUDA_VISIBLE_DEVICES" in s["env"] for s in _Proc.started] == [False, False]


def test_serve_on_cuda_n_binds_the_device(monkeypatch):
    """`moska serve --device cuda:N` makes N current (Triton and CUDA graphs follow it);
    a plain cuda (the placed instance's own GPU 0) or cpu leaves the device alone."""
    import torch

    from moska.engine import engine_factory

    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(str(d)))
    for device in ("cuda:1", "cuda", "cpu", torch.device("cuda", 3)):
        engine_factory.bind_cuda_device(device)
    assert seen == ["cuda:1", "cuda:3"]


_SEEN_DEVICE: list = []


def _fake_rebuild(*args):
    """Stands in for torch's rebuild_cuda_tensor (no GPU here): records storage_device."""
    import torch

    _SEEN_DEVICE.append(args[6])
    return torch.zeros((4, 16), dtype=torch.uint8)


def test_a_cuda_ipc_ring_is_opened_from_the_readers_own_gpu():
    """A decode rank on cuda:1 opens the prefill's buffer from cuda:1 (peer access), not
    from the writer's device index 0, which would start a context on cuda:0 and receive
    there; without a device the writer's index stays (the placed case: both are 0)."""
    import base64
    import dataclasses
    import pickle

    import torch

    from moska.pd import ring as rings

    writer = rings.Ring.create("shm")  # its control file: magic and nonce as offered
    args = (torch.Tensor, (4, 16), (16, 1), 0, None, torch.uint8, 0, b"h", 64, 0,
            b"r", 0, b"e", False)  # fmt: skip
    payload = base64.b64encode(pickle.dumps((_fake_rebuild, args))).decode()
    spec = dataclasses.replace(writer.spec, kind="cuda_ipc", ipc=payload)
    try:
        _SEEN_DEVICE.clear()
        rings.Ring.attach(spec, torch.device("cuda", 1)).close()
        rings.Ring.attach(spec).close()
        rings.Ring.attach(spec, torch.device("cpu")).close()
        assert _SEEN_DEVICE == [1, 0, 0]
    finally:
        writer.close()
