"""Where a B=1 / 16 decode step of an 8B-shaped model spends its GPU time.

Profiles 20 engine steps (eager, so each kernel shows by name; a graph replays the same
kernels) and prints GPU time per step by kernel, next to the step's wall time with graphs.
Usage on the GPU machine: PYTHONPATH=. python3 bench/engine_profile.py  (JSON in $OUT)
"""

import json
import os
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
for batch in (1, 16):
    for eager in (True, False):
        cfg = EngineConfig(
            model="random-8b", device="cuda", num_kv_blocks=4096, enforce_eager=eager
        )
        engine = LLMEngine(cfg, loaded)
        engine.capture_graphs(progress=False)
        rng = random.Random(0)
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", [rng.randrange(128000) for _ in range(512)], params)
        for _ in range(30):  # prefill and warm-up
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            engine.step()
        step_ms = (time.perf_counter() - t0) / 50 * 1e3
        row = {"step_ms": step_ms}
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        kern = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" and e.count:
                kern[e.key[:70]] = round(e.device_time_total / 20, 1)
        row["gpu_us_per_step"] = round(sum(kern.values()), 1)
        row["kernels_us_per_step"] = dict(sorted(kern.items(), key=lambda kv: -kv[1])[:25])
        name = f"b{batch}_{'eager' if eager else 'graph'}"
        res[name] = row
        print(name, "step ms {:.2f}, GPU us/step {:.0f}".format(step_ms, row["gpu_us_per_step"]))
        if eager:
            for k, v in list(row["kernels_us_per_step"].items())[:14]:
                print(f"   {v:9.1f} us  {k}")
        del engine
        torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "/tmp"), "engine_profile.json"), "w") as f:
    json.dump(res, f, indent=1)
