"""Shared pieces of the benchmarks: random models of real shapes (no download), the
environment record every JSON carries, and CUDA-event timing."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def random_loaded_model(hf_config: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """A LoadedModel with random weights of the given HF config, built on `device`."""
    from moska.model.config import ModelConfig
    from moska.model.llama import CausalLM
    from moska.model.loader import LoadedModel

    config = ModelConfig.from_dict(hf_config)
    torch.manual_seed(seed)
    model = CausalLM(config, dtype=dtype, device="meta").to_empty(device=device)
    model.rotary.reset_inv_freq()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.requires_grad_(False).eval()
    return LoadedModel(model, config, None, None)  # no files: no weights hash


def git_commit() -> dict:
    """The commit this code ran at: `git rev-parse HEAD` of the checkout, else the
    MOSKA_GIT_COMMIT variable (a copied tree without .git, as on the lent GPU machine)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"git_commit": head, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": os.environ.get("MOSKA_GIT_COMMIT", "unknown"), "git_dirty": None}


def exact_command() -> str:
    """The command line as typed (interpreter, -m module and every argument)."""
    import shlex

    return " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", sys.argv))


def environment(argv: list[str] | None = None) -> dict:
    """Versions, time, device, git commit and command of a benchmark run. Without argv the
    command is the exact one typed; with it, `python -m <argv...>` (for main(argv) calls)."""
    import triton

    command = exact_command() if argv is None else " ".join(["python", "-m", *argv])
    env = {
        "command": command,
        **git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def cuda_time_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def capture_graph(fn):
    """fn captured as a CUDA graph after one warm-up on a side stream; returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Median milliseconds: CUDA events on a GPU, the host clock otherwise."""
    if torch.cuda.is_available():
        return cuda_time_ms(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
