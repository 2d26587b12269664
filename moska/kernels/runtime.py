"""Where a Triton kernel can launch: on CUDA tensors, or on the CPU through Triton's
interpreter. The interpreter is chosen when a kernel is decorated (TRITON_INTERPRET=1 at
import), and a kernel decorated without it cannot run on the CPU, so the check looks at
the kernel object itself; launchers fall back to their PyTorch references otherwise."""

import os

import torch


def triton_runs_on(device: torch.device, kernel) -> bool:
    if device.type == "cuda":
        return True
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    return interpreted and os.environ.get("TRITON_INTERPRET") == "1"
