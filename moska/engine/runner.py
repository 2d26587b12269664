"""The model runner: turns one scheduler decision into tensors, runs the model once over
all scheduled tokens (prefill chunks and decodes together), and samples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moska.attention.backend import PagedAttention
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.config import EngineConfig
from moska.engine import prompt_logprobs
from moska.engine.cuda_graphs import DecodeGraphs, GraphCaptureError, LibrarySpec
from moska.engine.memory import MemoryPlan, plan_memory
from moska.engine.request import Request
from moska.engine.sampler import SampledBatch, Sampler
from moska.engine.step_inputs import StepInputs, flatten_step
from moska.engine.step_output import PendingStep, StepResult
from moska.engine.transfer import host_tensor, to_device, to_host_async
from moska.flexicache.engine_graphs import plain_graphs
from moska.flexicache.engine_hook import flexi_engine
from moska.kernel_ops import kernel_ops

if TYPE_CHECKING:
    from moska.attention.metadata import SharedLibrary

__all__ = ["GraphReplay", "ModelRunner", "PendingStep", "StepResult"]  # step_output's, too

logger = logging.getLogger(__name__)


def _report_copy(t: torch.Tensor) -> torch.Tensor:
    """A graph's routing tensor copied for its step's report: queued into pinned host
    memory on CUDA, read once the step's sampled tokens are (the sampler's event follows
    it on the stream); a `.cpu()` at read time would wait for the step queued after it."""
    return to_host_async(t) if t.is_cuda else t.clone()


@dataclass(frozen=True)
class GraphReplay:
    """A decode step replayed from a CUDA graph: of steps without a library (`library`
    None) or of the one library every row reads."""

    library: LibrarySpec | None


class ModelRunner:
    def __init__(self, loaded, config: EngineConfig, device: torch.device) -> None:
        self.model = loaded.model
        self.mcfg = loaded.config
        self.config = config
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = config.block_size
        # tensor parallelism (distributed/tensor_parallel.py): the model is this rank's
        # slice, its config counts this rank's KV heads; every rank takes the same number
        # of blocks (the fewest any can hold); decode steps are CUDA graphs with NCCL
        # (every rank replays the same one, distributed/tp_graphs.py), eager on gloo
        self.tensor_parallel_size = getattr(self.model, "tensor_parallel_size", 1)
        self.num_kv_heads = self.model.config.num_kv_heads
        # weights, activations, graphs, unique KV, library cache (engine/memory.py)
        self.memory_plan = self._plan_memory()
        num_blocks = self.memory_plan.num_kv_blocks
        # decode context parallelism (distributed/kv_parallel_step.py): requests' KV blocks
        # sharded over ranks; this cache holds this rank's, the block manager every rank's
        kv_parallel = getattr(self.model, "kv_parallel", None)
        if self.tensor_parallel_size > 1 or kv_parallel is not None:
            num_blocks = self.model.agree_num_blocks(num_blocks)
        use_graphs = self._use_graphs(kv_parallel)
        self.cache = PagedKVCache(
            self.mcfg.num_kv_layers,  # one per layer that owns KV (fewer under MLKV)
            num_blocks + int(use_graphs),  # + the CUDA graphs' scratch block, owned by no request
            self.block_size,
            self.num_kv_heads,
            self.mcfg.head_dim,
            self.dtype,
            device,
        )
        # the one kernel table (attention, routing, norms, RoPE, SiLU-and-mul), model included
        self.ops = kernel_ops(config.attention, device)
        self.model.kernels = self.ops
        self.attention = PagedAttention(self.cache, self.ops, self.mcfg.sm_scale)
        self.flexi = flexi_engine(config, self.mcfg.num_kv_layers, self.num_kv_heads, device)
        self.flexi_graphs = plain_graphs(self, config)  # FlexiCache's plain steps (CUDA)
        self.sampler = Sampler(config.seed)
        self._num_blocks = num_blocks
        if kv_parallel is not None:
            self.attention = kv_parallel.attention(self.cache, self.ops, self.mcfg.sm_scale)
            self._num_blocks = kv_parallel.global_blocks(num_blocks)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            max_len = min(
                config.max_model_len or self.mcfg.max_position_embeddings,
                self.mcfg.max_position_embeddings,
            )
            make = DecodeGraphs if self.tensor_parallel_size == 1 else self.model.decode_graphs
            self.graphs = make(
                model=self.model,
                attention=self.attention,
                scratch_block=num_blocks,
                block_size=self.block_size,
                max_blocks=-(-max_len // self.block_size),
                max_batch=config.max_num_seqs,
                device=device,
            )

    def _use_graphs(self, kv_parallel) -> bool:
        """Whether decode steps are CUDA graphs (a test may force it on CPU, with the
        capture faked: tests/distributed/test_tp_graphs.py)."""
        config = self.config
        tp_graphs = self.tensor_parallel_size == 1 or getattr(self.model, "graph_capturable", 0)
        use_graphs = self.device.type == "cuda" and not config.enforce_eager and bool(tp_graphs)
        use_graphs = use_graphs and not getattr(config, "shared_kv_ranks", 0)  # eager: talks
        use_graphs = use_graphs and kv_parallel is None
        return use_graphs and config.flexicache is None  # FlexiCache steps run eagerly

    @property
    def num_blocks(self) -> int:
        """KV blocks requests may own (the CUDA graphs' scratch block is not one of them)."""
        return self._num_blocks

    def _plan_memory(self) -> MemoryPlan:
        """The unique KV's blocks and the library cache's share of the device memory
        budget; MemoryBudgetError (at startup) when a part does not fit."""
        per_block = PagedKVCache.bytes_per_block(
            self.mcfg.num_kv_layers,
            self.block_size,
            self.num_kv_heads,
            self.mcfg.head_dim,
            self.dtype,
        )
        tensors = (*self.model.parameters(), *self.model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors)
        graphs = self.device.type == "cuda" and not self.config.enforce_eager
        tp_graphs = getattr(self.model, "graph_capturable", False)
        graphs = graphs and (self.tensor_parallel_size == 1 or tp_graphs)
        graphs = graphs and not getattr(self.config, "shared_kv_ranks", 0)
        graphs = graphs and getattr(self.config, "decode_context_parallel_size", 1) == 1
        tiers = getattr(self.config, "tier_config", None)
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        return plan_memory(
            self.config,
            self.mcfg,
            self.device,
            weights,
            per_block,
            torch.empty((), dtype=self.dtype).element_size(),
            graphs,
            library_reserve=tiers.gpu_bytes(self.device) if tiers is not None else 0,
            free=free,
        )

    @torch.inference_mode()
    def launch(
        self,
        scheduled: list,  # [ScheduledRequest(request, num_new_tokens)]
        block_table: Callable[[str], list[int]],  # request id -> its KV blocks
        top_k_default: int,
        prev: PendingStep | None = None,
    ) -> PendingStep:
        """Queue one step on the device without waiting for it. An input token still in
        flight (sampled by ``prev``, not yet on the host) is read from ``prev``'s device
        tokens. Each request reads the library build it holds (``request.library``);
        rows are grouped by build id."""
        x = flatten_step(
            scheduled, block_table, self.block_size, top_k_default, self._routing_policy
        )
        blended = self._blended(scheduled, x)
        if blended is not None:  # SemShareKV's blend computed every row: no forward
            return blended
        device_ids = self._device_inputs(x.pending, prev)
        replay = self._graph_replay(scheduled, x)
        if replay is not None:
            assert self.graphs is not None  # a replay is only planned when graphs exist
            self._logits_follow(x)
            try:
                hidden, report = self.graphs.run(
                    host_tensor(x.token_ids, torch.int64, self.device),
                    host_tensor(x.positions, torch.int64, self.device),
                    host_tensor(x.slots, torch.int64, self.device),
                    host_tensor(x.seq_lens, torch.int32, self.device),
                    host_tensor(x.tables, torch.int32, self.device),
                    replay.library,
                    device_ids,
                )
            except GraphCaptureError as e:
                self._go_eager(e)
            else:
                # the report's tensors are the graph's: the next replay overwrites them
                routing = [report.snapshot(_report_copy)] if report is not None else []
                step = self._sample(hidden, x, routing)
                step.decode_only = step.routing_owned = True
                return step
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(x.slots, dev, torch.int64),
            cu_q_lens=to_device(x.cu_q, dev, torch.int32),
            seq_lens=to_device(x.seq_lens, dev, torch.int32),
            block_tables=to_device(x.tables, dev, torch.int32),
            decode_only=x.decode_only,
        )
        if self.flexi is not None:  # per-KV-head page lists; released blocks are -1
            ids = [it.request.request_id for it in scheduled]
            meta.block_tables.clamp_(min=0)
            if meta.decode_only:
                meta.flexi = self.flexi.begin(ids, meta.block_tables, x.seq_lens)
            else:  # the decode rows, patched after plain attention
                decoding = [it.request.num_output_tokens > 0 for it in scheduled]
                meta.flexi = self.flexi.begin_mixed(
                    ids, meta.block_tables, x.seq_lens, x.cu_q, decoding
                )
        num_layers = self.mcfg.num_kv_layers  # attention layers index KV slots
        sampled_layers = frozenset({0, num_layers // 2, num_layers - 1})
        for name, rows in x.lib_rows.items():
            wants = any(r.report_routing for r, _ in x.record_reqs.get(name, []))
            meta.groups.append(
                LibraryGroup(
                    library=x.libs[name],
                    rows=to_device(rows, dev, torch.int64),
                    top_k=x.lib_topk[name],
                    policy=x.lib_policy[name],
                    all_rows=rows == list(range(len(x.token_ids))),
                    record=name in x.record_reqs,
                    coverage_layers=sampled_layers if wants else frozenset(),
                )
            )
        ids_t = to_device(x.token_ids, dev, torch.int64)
        if device_ids is not None:
            ids_t.index_copy_(0, *device_ids)
        pos_t = to_device(x.positions, dev, torch.int64)
        bound = self.attention.bind(meta)
        self._logits_follow(x)
        replayed = None
        if self.flexi_graphs is not None:  # a plain FlexiCache step: replayed from a graph
            replayed = self.flexi_graphs.run(meta, ids_t, pos_t)
        hidden = replayed if replayed is not None else self.model(ids_t, pos_t, bound)
        if meta.flexi is not None:  # FlexiCache: a deferred re-ranking after the forward
            meta.flexi.finish(self.cache.k, self.mcfg.sm_scale)
        # the groups' routing reports, kept by the bound attention (none without groups)
        step = self._sample(hidden, x, bound.routing if meta.groups else [])
        step.decode_only = meta.decode_only
        return step

    def capture_graphs(
        self, libraries: Mapping[str, SharedLibrary], top_k: int, progress: bool = True
    ) -> int:
        """Capture the decode graphs ahead of traffic: every bucket without a library and
        with each of `libraries` (name -> loaded library, read with `top_k` and its default
        scorer). Returns how many were captured; 0 without graphs. A capture failure logs a
        warning and leaves the runner eager, as it would on first use."""
        if self.graphs is None:
            return 0
        specs: list[LibrarySpec | None] = [None]
        for lib in libraries.values():
            if getattr(lib, "tiers", None) is not None:  # tiered libraries run eagerly
                continue
            policy = self.config.routing_policy
            specs.append(
                LibrarySpec(lib.build_id, lib, top_k, "keymax", record=True, policy=policy)
            )
        try:
            return self.graphs.capture(specs, progress=progress)
        except GraphCaptureError as e:
            self._go_eager(e)
            return 0

    def _logits_follow(self, x: StepInputs) -> None:
        """Tensor parallelism: tell the workers (in the step's header) what `_sample_rows`
        will ask of every row when all rows sample: the logits (1), or only the argmax
        tokens when every row is greedy (2: a [N, 2] gather instead of [N, V / n])."""
        if self.tensor_parallel_size > 1:
            every = len(x.sample_rows) == len(x.token_ids)
            argmax = every and self._argmax_gather(x.sample_reqs)
            self.model.logits_follow = 2 if argmax else int(every)

    def _argmax_gather(self, reqs: list) -> bool:
        """Whether the step's sampling is an argmax that the tensor-parallel model does
        itself (greedy_tokens), so that rank 0 never gathers the logits."""
        params = [r.sampling_params for r in reqs]
        return getattr(self.model, "argmax_gather", False) and Sampler.argmax_only(params)

    def _go_eager(self, e: GraphCaptureError) -> None:
        logger.warning("%s; decode steps run eagerly from now on", e)
        self.graphs = None

    def _device_inputs(self, pending: list[tuple[int, str]], prev: PendingStep | None):
        """(rows, tokens) on the device for the input tokens in flight, or None."""
        if not pending:
            return None
        index = prev.token_index() if prev is not None and prev.batch is not None else {}
        missing = [rid for _, rid in pending if rid not in index]
        if missing:
            raise RuntimeError(f"input tokens in flight with no step in flight: {missing[:4]}")
        rows = to_device([row for row, _ in pending], self.device, torch.int64)
        src = to_device([index[rid] for _, rid in pending], self.device, torch.int64)
        assert prev is not None and prev.batch is not None  # the index came from it
        return rows, prev.batch.tokens.index_select(0, src)

    def _routing_policy(self, req: Request):
        """The request's routing policy (SamplingParams.routing), else the engine's."""
        return req.sampling_params.routing or self.config.routing_policy

    def _graph_replay(self, scheduled: list, x: StepInputs) -> GraphReplay | None:
        """The CUDA-graph replay this step can be, or None when it runs eagerly."""
        g = self.graphs
        if g is None or not x.decode_only or g.bucket(len(scheduled)) is None:
            return None
        if not x.lib_rows:
            return GraphReplay(None)
        if len(x.lib_rows) > 1 or self.tensor_parallel_size > 1:  # TP: library steps eager
            return None
        ((name, rows),) = x.lib_rows.items()
        reqs = x.record_reqs.get(name, [])
        if len(rows) != len(x.token_ids) or any(r.report_routing for r, _ in reqs):
            return None
        lib = x.libs[name]
        if getattr(lib, "tiers", None) is not None:  # tiered: fetches and host syncs, eager
            return None
        if getattr(lib, "parts", None) is not None:  # composed: the graphs hold one library
            return None
        policy = x.lib_policy.get(name)
        if policy is not None and not policy.graph_safe:  # adaptive k, pages: host syncs
            return None
        spec = LibrarySpec(name, lib, x.lib_topk[name], "keymax", record=bool(reqs), policy=policy)
        return GraphReplay(spec)

    def _sample(self, hidden: torch.Tensor, x: StepInputs, routing: list) -> PendingStep:
        """Queue the sampler (and the prompt logprobs) behind the forward's `hidden`."""
        step = self._sample_rows(hidden, x.sample_rows, x.sample_reqs)
        step.routing, step.lib_rows, step.record_reqs = routing, x.lib_rows, x.record_reqs
        step.prompt_lp = prompt_logprobs.compute(self.model, hidden, x.prompt_rows)
        return step

    def _blended(self, scheduled: list, x: StepInputs) -> PendingStep | None:
        """A step whose every item is a planned prompt's last token that SemShareKV's blend
        computed (KV written, final hidden state on the item: `semshare/reuse.py`): sampled
        from those hidden states, without the forward's pass over the weights. None for any
        other step (and with FlexiCache or model parallelism, whose forwards do more)."""
        rows: list[torch.Tensor] = []
        for item in scheduled:
            hidden = getattr(item, "semantic_hidden", None)
            if hidden is None:
                return None
            rows.append(hidden)
        if (
            not rows
            or len(x.sample_rows) != len(rows)
            or len(x.token_ids) != len(rows)
            or x.lib_rows
            or x.prompt_rows
            or x.pending
            or self.flexi is not None
            or self.tensor_parallel_size > 1
            or getattr(self.model, "kv_parallel", None) is not None
        ):
            return None
        step = self._sample(rows[0] if len(rows) == 1 else torch.cat(rows), x, [])
        step.decode_only = x.decode_only
        return step

    def _sample_rows(self, hidden, sample_rows, sample_reqs) -> PendingStep:
        step = PendingStep(sample_reqs, None, [], {}, {})
        if not sample_rows:
            return step
        if len(sample_rows) == hidden.shape[0]:  # every row samples (a decode step)
            last = hidden
        else:  # a non-blocking copy: the host queues the sampler behind the forward
            last = hidden.index_select(0, to_device(sample_rows, self.device, torch.int64))
        if last is hidden and self._argmax_gather(sample_reqs):  # announced by _logits_follow
            step.batch = SampledBatch(self.model.greedy_tokens(last), [], [], None, None, None)
            return step
        logits = self.model.compute_logits(last)
        params = [r.sampling_params for r in sample_reqs]
        step.needs_history = any(p.needs_history for p in params)
        prompts = outputs = None
        if step.needs_history:  # the lists themselves, not copies: read before they change
            behind = [r.request_id for r, p in zip(sample_reqs, params)
                      if p.needs_history and r.num_in_flight]  # fmt: skip
            if behind:  # the engine runs no step ahead of a sampler that reads its tokens
                raise RuntimeError(f"a sampler reads token ids still in flight: {behind[:4]}")
            prompts = [r.prompt_token_ids for r in sample_reqs]
            outputs = [r.output_token_ids for r in sample_reqs]
        step.batch = self.sampler.sample(
            logits, params, [r.request_id for r in sample_reqs], prompts, outputs
        )
        return step

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        if self.flexi is not None:
            self.flexi.release(request_id)
