"""The offline Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Self

from tqdm.auto import tqdm

from moska.engine.llm_engine import LLMEngine
from moska.engine.outputs import RequestOutput
from moska.engine.sampling_params import SamplingParams


class LLM:
    """Load a model once, then generate for batches of prompts.

    model: an HF model directory, or None for the built-in tiny model. Other keyword
    arguments are EngineConfig fields (device, dtype, attention, num_kv_blocks, ...).
    With tensor_parallel_size=N it starts N-1 worker processes; `shutdown()` (or leaving a
    `with LLM(...)` block, or the interpreter's exit) stops them.
    """

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = LLMEngine.from_model(model, **engine_kwargs)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any."""
        self.engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def memory(self):
        """The startup memory plan (engine/memory.py MemoryPlan: weights, activations,
        CUDA graphs, unique KV, library cache; `.lines()` is what the engine logged)."""
        return self.engine.runner.memory_plan

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | None = None,
        *,
        library: str | list[str] | None = None,
        top_k_chunks: int | None = None,
        report_routing: bool = False,
        use_tqdm: bool = False,
        libraries: list[str] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in order, with
        `n` completions each. `libraries`: several position-independent libraries read
        together (library/composition.py)."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        groups: list[list[str]] = []
        for prompt in prompts:
            ids = []
            for i in range(params.n):
                rid = f"gen-{next(self._ids)}"
                seed = None if params.seed is None else params.seed + i
                child = replace(params, n=1, seed=seed)
                self.engine.add_request(
                    rid,
                    prompt,
                    child,
                    library=library,
                    top_k_chunks=top_k_chunks,
                    report_routing=report_routing,
                    libraries=libraries,
                )
                ids.append(rid)
            groups.append(ids)
        finished: dict[str, RequestOutput] = {}
        total = sum(len(g) for g in groups)
        with tqdm(total=total, disable=not use_tqdm, desc="generate", unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        results = []
        for ids in groups:
            outs = [finished[r] for r in ids]
            completions = []
            for i, o in enumerate(outs):
                c = o.outputs[0]
                c.index = i
                completions.append(c)
            results.append(
                RequestOutput(
                    request_id=ids[0],
                    prompt_token_ids=outs[0].prompt_token_ids,
                    outputs=completions,
                    finished=True,
                    routed_chunks=outs[0].routed_chunks,
                    routing_coverage=outs[0].routing_coverage,
                    routing_layers=outs[0].routing_layers,
                    prompt_logprobs=outs[0].prompt_logprobs,
                    num_cached_tokens=outs[0].num_cached_tokens,
                    num_reused_tokens=outs[0].num_reused_tokens,
                )
            )
        return results
