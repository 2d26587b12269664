"""Where the host time of a CUDA-graph decode step goes (8B-shaped random model).

For B in {1, 16, 64}: wall time per step, the GPU's busy time per step (torch profiler,
kernels and copies), and a cProfile of 40 steps sorted by own time, so the step's host
work (scheduling, input tensors, graph launch, sampling, outputs) is visible by function.
Usage on the GPU machine: PYTHONPATH=. python3 bench/host_profile.py  (JSON in $OUT)
"""

import cProfile
import io
import json
import os
import pstats
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moska.bench.common import LLAMA_3_1_8B, environment, random_loaded_model
from moska.config import EngineConfig
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

loaded = random_loaded_model(LLAMA_3_1_8B, torch.bfloat16, "cuda")
res = environment()
for batch in (1, 16, 64):
    engine = LLMEngine(EngineConfig(model="random-8b", device="cuda", num_kv_blocks=8192), loaded)
    engine.capture_graphs(progress=False)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(128000) for _ in range(512)], params)
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40):
        engine.step()
    step_ms = (time.perf_counter() - t0) / 40 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(40):
        engine.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    c = io.StringIO()
    pstats.Stats(pr, stream=c).sort_stats("cumtime").print_stats(30)
    row = {
        "step_ms": step_ms,
        "gpu_us_per_step": gpu_us / 20,
        "tottime": s.getvalue(),
        "cumtime": c.getvalue(),
    }
    res[f"b{batch}"] = row
    print(f"B={batch}: step {step_ms:.2f} ms, GPU busy {gpu_us / 20 / 1e3:.2f} ms")
    print("\n".join(s.getvalue().splitlines()[:40]))
    del engine
    torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "/tmp"), "host_profile.json"), "w") as f:
    json.dump(res, f, indent=1)
