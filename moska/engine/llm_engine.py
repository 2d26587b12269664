"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

add_request -> Scheduler (waiting) -> step(): schedule -> ModelRunner.launch (router ->
shared -> unique -> merge inside attention) -> Scheduler.update_from_output -> detokenize,
stop strings -> RequestOutput deltas.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from moska.cache.block_manager import BlockManager
from moska.config import EngineConfig
from moska.engine import compile_watch
from moska.engine.errors import DuplicateRequestError, RequestError, StepFailedError
from moska.engine.intake import acquire_handle, make_request
from moska.engine.memory import LibraryMemory
from moska.engine.output_builder import TrackedRequest, build_output
from moska.engine.outputs import RequestOutput, TokenLogprob
from moska.engine.runner import ModelRunner
from moska.engine.sampling_params import SamplingParams
from moska.engine.scheduler import Scheduler, SchedulerOutput
from moska.engine.scheduler_config import SchedulerConfig
from moska.engine.step_output import PendingStep, StepResult
from moska.library.composition import library_names, parts_of
from moska.model.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    waiting_prefill_tokens: int
    kv_usage: float
    num_kv_blocks: int
    steps: int
    generated_tokens: int
    prompt_tokens_computed: int
    last_step_seconds: float
    chunks_routed: int
    failed_steps: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded, libraries=None) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.device = next(loaded.model.parameters()).device
        # the id clients send as `model`: the directory's name, not the server's path
        self.model_name = (
            os.path.basename(os.path.normpath(config.model)) if config.model else "moska-tiny"
        )
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.runner = ModelRunner(loaded, config, self.device)
        self.semshare = None  # SemShareKV (moska/semshare/reuse.py: plan, prefill, record)
        if config.semantic_reuse:
            from moska.semshare.reuse import SemanticReuse

            self.semshare = SemanticReuse.for_engine(config, self.runner)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        if self.semshare is not None:  # references become blocks of the cache, shared
            self.semshare.attach(self.block_manager)
        flexi = getattr(self.runner, "flexi", None)
        if flexi is not None:  # FlexiCache releases blocks of offloaded requests
            flexi.attach(self.block_manager, self.runner.cache)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.libraries = libraries
        plan = getattr(self.runner, "memory_plan", None)
        if plan is not None:  # engine/memory.py: library loads are checked against it
            for line in plan.lines():
                logger.info("%s", line)
            if libraries is not None:
                libraries.memory = LibraryMemory(plan)
        self._tracked: dict[str, TrackedRequest] = {}
        self._steps = 0
        self._generated = 0
        self._prompt_computed = 0
        self._last_step_s = 0.0
        self._chunks_routed = 0
        self._failed_steps = 0
        self.last_step_captured_graph = False  # the last step paid a CUDA graph capture
        self.last_step_compiled = False  # ... or a Triton kernel compile (compile_watch)
        if self.device.type == "cuda":
            compile_watch.install()
        # library decode steps replayed from a CUDA graph run ahead too (their routing
        # reports are snapshots); False: they wait for their tokens (benchmarks' A/B)
        self.async_library_steps = True
        self.async_scheduling = (
            self.device.type == "cuda"
            if config.async_scheduling is None
            else config.async_scheduling
        )
        # the step queued on the device whose tokens the host has not read yet
        self._in_flight: tuple[SchedulerOutput, PendingStep, float] | None = None
        # tensor parallelism: the other ranks (distributed/runtime.py); set by from_model
        self.dist = None

    @classmethod
    def from_model(cls, model: str | None = None, **kwargs) -> LLMEngine:
        """Load `model` (an HF directory; None for the built-in tiny model) and build an engine.
        Keyword arguments are EngineConfig fields (engine/engine_factory.py)."""
        from moska.engine.engine_factory import load_engine

        return load_engine(cls, model, **kwargs)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank). The engine
        cannot run steps afterwards."""
        if self.dist is not None:
            self.dist.shutdown()

    def capture_graphs(self, progress: bool = True) -> int:
        """Capture the CUDA graphs of decode steps now rather than on each batch size's
        first step: plain decode and decode over each library loaded so far. Returns how
        many were captured (0 on CPU or with enforce_eager)."""
        libs = {}
        if self.libraries is not None:
            libs = {name: self.libraries.get(name) for name in self.libraries.loaded_names()}
        return self.runner.capture_graphs(libs, self.config.default_top_k_chunks, progress)

    # ---- requests -------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        library: str | Sequence[str] | None = None,
        top_k_chunks: int | None = None,
        report_routing: bool = False,
        libraries: Sequence[str] | None = None,
    ) -> None:
        """Queue a request. `library`: a library name, or several (or `libraries`): a
        composition of position-independent libraries built for this model, routed over the
        union of their chunks (library/composition.py; CompositionError when they do not
        compose). report_routing: also measure, each step, the share of the library's
        attention mass its routed chunks cover (costs an all-chunks pass on three layers; for
        debugging routing). Raises RequestError (a ValueError) or LibraryNotFoundError."""
        if request_id in self._tracked:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use")
        if params.n != 1:
            raise RequestError("LLMEngine takes n=1 per request; submit n requests instead")
        if top_k_chunks is not None and top_k_chunks < 1:
            raise RequestError("top_k_chunks must be a positive number of chunks")
        if library is not None and libraries is not None:
            raise RequestError("give `library` or `libraries`, not both")
        names = library_names(libraries if libraries is not None else library)
        library = names[0] if names else None
        if self.dist is not None:
            self.dist.raise_if_failed()
            if len(names) > 1:
                raise RequestError(
                    "composed libraries (several in one request) do not run with tensor "
                    "parallelism or shared-KV ranks yet; send one library or serve with "
                    "tensor_parallel_size=1 and shared_kv_ranks=0"
                )
            if report_routing and self.config.shared_kv_ranks:
                raise RequestError(
                    "report_routing's coverage needs every chunk's KV on the engine's rank; "
                    "with shared_kv_ranks the chunks are on the shared ranks: leave it off"
                )
        if library is not None and self.libraries is None:
            raise RequestError("this engine has no library manager")
        # The request holds its libraries' builds from here to its end (released in _drop).
        handle = acquire_handle(self.libraries, names)
        try:
            self._add(request_id, prompt, params, handle, top_k_chunks, report_routing)
        except BaseException:
            for part in parts_of(handle):
                self.libraries.release(part)
            raise

    def _add(self, request_id, prompt, params, handle, top_k_chunks, report_routing) -> None:
        req = make_request(
            request_id, prompt, params, handle, top_k_chunks, report_routing,
            tokenizer=self.tokenizer, model_config=self.model_config,
            max_model_len=self.max_model_len, semshare=self.semshare,
        )  # fmt: skip
        self.scheduler.add_request(req)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        self._tracked[request_id] = TrackedRequest(req, detok)

    def abort_request(self, request_id: str) -> None:
        if request_id in self._tracked:
            self.scheduler.abort_request(request_id)
            self._drop(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    # ---- one step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the outputs of the tokens that reached the host.

        With asynchronous scheduling a decode step is queued on the device and its tokens
        are read during the next call, after that call has queued its own step: the host's
        work (scheduling, inputs, detokenizing) overlaps the device's. Until the tokens
        arrive the requests count them in flight (see Scheduler); a request that turns out
        to have stopped had one extra step computed, which is dropped.

        If the step raises, the scheduler rolls it back (Scheduler.recover_step): its
        requests are recomputed, each alone first, and one that fails alone ends as aborted;
        StepFailedError names those ended (none when the step was shared). Requests outside
        the step are untouched.
        """
        if self.dist is not None:
            self.dist.raise_if_failed()  # a dead rank: every step would fail
        out = self.scheduler.schedule()
        prev = self._in_flight
        self._in_flight = None
        compiles = compile_watch.count()
        try:
            return self._run_step(out, prev)
        except Exception as exc:
            self._in_flight = None
            failed = None if self.dist is None else self.dist.failure_after(exc)
            extra = [] if prev is None else [item.request for item in prev[0].scheduled]
            culprits = self.scheduler.recover_step(out, extra)
            ids = [r.request_id for r in culprits if r.request_id in self._tracked]
            for rid in ids:
                self._drop(rid)
            self._failed_steps += 1
            if failed is not None:  # not the step's fault: the engine cannot step any more
                raise failed from exc
            logger.exception(
                "step failed; %d request(s) ended (%s), the others run again, each alone first",
                len(ids),
                ids[:8],
            )
            raise StepFailedError(ids, exc) from exc
        finally:
            self.last_step_compiled = compile_watch.count() != compiles

    def _run_step(
        self, out: SchedulerOutput, prev: tuple[SchedulerOutput, PendingStep, float] | None
    ) -> list[RequestOutput]:
        if not out.scheduled:
            return self._finish(*prev) if prev is not None else []
        t0 = time.perf_counter()
        graphs = self.runner.graphs
        captures = 0 if graphs is None else graphs.captures
        if self.semshare is not None:  # planned prompt ranges: all but their last token
            self.semshare.prefill(out.scheduled, self.block_manager.block_table)
        pending = self.runner.launch(
            out.scheduled,
            self.block_manager.block_table,
            self.config.default_top_k_chunks,
            prev[1] if prev is not None else None,
        )
        if self.semshare is not None:  # prompts completed in full become references
            self.semshare.record(out.scheduled, self.block_manager.block_table)
        self.last_step_captured_graph = graphs is not None and graphs.captures != captures
        self._steps += 1
        for item in out.scheduled:
            r = item.request
            self._prompt_computed += max(
                0, min(item.num_new_tokens, r.num_prompt_tokens - r.num_computed_tokens)
            )
        outputs = self._finish(*prev) if prev is not None else []
        # Only decode steps run ahead: a step with prompt tokens may wait on the device inside
        # its forward, so its tokens would reach the host a whole step later (time to first
        # token doubled in the smoke run), an eager library step reads its routing back (one
        # replayed from a graph reads a snapshot of it), and a step whose sampler reads
        # token ids (penalties, logits processors) needs them all real.
        library_ahead = self.async_library_steps and pending.routing_owned
        if (
            self.async_scheduling
            and pending.decode_only
            and (not pending.reads_library or library_ahead)
            and not pending.needs_history
        ):
            self.scheduler.update_from_output(out, None)  # its tokens in flight
            self._in_flight = (out, pending, t0)
            return outputs
        return outputs + self._finish(out, pending, t0, in_flight=False)

    def _finish(
        self, out: SchedulerOutput, pending: PendingStep, t0: float, in_flight: bool = True
    ) -> list[RequestOutput]:
        """Wait for a queued step's tokens and turn them into outputs. `in_flight`: the
        scheduler was already updated with the tokens in flight, which land now."""
        result: StepResult = pending.result()
        self._last_step_s = time.perf_counter() - t0
        for rid, report in result.routing.items():
            self._chunks_routed += len(report.chunks)
            if rid in self._tracked:
                self._tracked[rid].routing = report
        for rid, (pos, entries) in result.prompt_logprobs.items():
            tr = self._tracked.get(rid)
            if tr is None:
                continue
            prompt = tr.request.prompt_token_ids
            for j, (lp, top) in enumerate(entries):
                if pos + j == len(tr.prompt_logprobs):  # a recompute (preemption) repeats some
                    tr.prompt_logprobs.append(TokenLogprob(prompt[pos + j], lp, top))
        if in_flight:
            updated = []
            for req in pending.sample_reqs:
                if req.request_id not in self._tracked:  # aborted or stopped meanwhile
                    continue
                self.scheduler.resolve_in_flight(req, result.sampled[req.request_id])
                updated.append(req)
        else:
            updated = self.scheduler.update_from_output(out, result.sampled)
        outputs = []
        for req in updated:
            tr = self._tracked.get(req.request_id)
            if tr is None:
                continue
            self._generated += 1
            lp = result.logprobs.get(req.request_id)
            if lp is not None and req.output_token_ids:
                tr.logprobs.append(TokenLogprob(req.output_token_ids[-1], lp[0], lp[1]))
            outputs.append(self._make_output(tr))
        return outputs

    def _make_output(self, tr: TrackedRequest) -> RequestOutput:
        output = build_output(tr, self.scheduler)
        if tr.request.is_finished:
            self._drop(tr.request.request_id)
        return output

    def _drop(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        self.runner.release(request_id)
        if tracked is not None:
            for part in parts_of(tracked.request.library):
                self.libraries.release(part)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            waiting_prefill_tokens=self.scheduler.waiting_prefill_tokens,
            kv_usage=self.block_manager.usage,
            num_kv_blocks=self.runner.num_blocks,
            steps=self._steps,
            generated_tokens=self._generated,
            prompt_tokens_computed=self._prompt_computed,
            last_step_seconds=self._last_step_s,
            chunks_routed=self._chunks_routed,
            failed_steps=self._failed_steps,
        )
