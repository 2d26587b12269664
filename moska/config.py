"""Engine settings: one frozen dataclass, validated on construction, never mutated."""

from __future__ import annotations

from dataclasses import dataclass

from moska.flexicache.config import FlexiCacheConfig


class DeviceUnavailableError(ValueError):
    """The configured device or attention backend does not exist on this machine."""


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs a model.

    model: a local Hugging Face model directory, or None for the built-in tiny model.
    device: "cuda", "cpu" or "auto" (CUDA when available).
    dtype: "auto" (the checkpoint's own), "bfloat16", "float16" or "float32".
    attention: "auto" (Triton kernels on CUDA, plain PyTorch on CPU), "triton" or "torch".
    num_kv_blocks: unique-KV blocks to allocate; None sizes them from memory.
    gpu_memory_utilization, memory_budget: the device memory the engine accounts for at
        startup (weights, activations, CUDA graphs, unique KV, library cache; see
        `moska/engine/memory.py`): that share of the device's total, capped at
        `memory_budget` (a size such as "2GiB") when set; on CPU, of the machine's RAM.
    enforce_eager: never replay decode steps from CUDA graphs (on CUDA they are by default).
    async_scheduling: schedule and queue the next step before this step's tokens reach the
        host, hiding the host's work between steps (None: on CUDA, off on CPU). Steps that
        read a library still wait for their tokens (their routing reports are read back).
    enable_prefix_caching: reuse the KV blocks of a prompt prefix an earlier request computed.
    tensor_parallel_size: ranks the model is split over (one process each, on one host; see
        docs/distributed.md). Rank 0 is the calling process and starts the others.
    shared_kv_ranks: M > 0 puts every library's chunks on M processes of their own that
        hold no model weights (MoSKA disaggregation, docs/distributed.md); the engine
        routes and sends each selected chunk's query rows there, eagerly; with
        tensor_parallel_size N > 1 the N TP ranks do, each for its heads. 0: off.
        `shared_kv_replica_slots` > 0: every 16 forwards of a library, its most read chunks
        get up to that many extra copies per shared rank (EPLB-like; exact).
    decode_context_parallel_size: P > 1 shards every request's KV blocks over P ranks (one
        process each, each with the whole model; vLLM's name): a request longer than one
        rank's KV cache is served, attention partials merged by LSE (DistAttention). 1: off.
    helix: Helix (`distributed/helix.py`) instead: N = tensor_parallel_size ranks (or P
        when that is 1) split the weights as tensor parallelism does; attention shards KV
        blocks over P ranks and KV heads over N / P groups, an all-to-all merges the
        partials back into the tensor-parallel layout for o_proj and the FFN.
        `helix_microbatches` > 1: HOP-B, the all-to-all of one micro-batch of rows overlaps
        the attention of the next (1: off).
    library_gpu_budget: GPU memory for a library's chunk cache, a size ("8GiB", "512MiB", a
        plain number > 1 = GiB) or a share of free memory ("0.3"); None holds every library
        wholly on the device. A library larger than it is served from tiers
        (`moska/library/tiers.py`: GPU slots, pinned CPU memory of `library_cpu_budget`
        (None: the whole library; "0": none), disk), eagerly.
        `library_eviction` (lfu, lru), `library_miss_policy` (wait: exact; skip: a routed
        chunk not yet on the GPU is left out of that step), `library_prefetch`.
    fp8_attention: how FP8 (e4m3) libraries are read on CUDA: "upcast" (K/V tiles to bf16 in
        registers, exact on the e4m3 values; the default) or "mma" / "mma_qsplit" (FP8
        tensor cores, q and the weights cut to e4m3, V copied token-major at load: +50% of
        the library's KV bytes; `moska/library/fp8_mma.py`); "mma_qsplit_late": q split in
        the later half of the layers only, one-term q before. Hopper, chunks at multiples of
        16 rows (tiered: the copy of the GPU slots, out of the GPU budget); else upcast.
    semantic_reuse: SemShareKV (`moska/semshare/`): a new prompt reuses the KV of a stored,
        similar earlier prompt (LSH + token matching, RoPE re-rotated), recomputing the
        unmatched tokens and `semantic_recompute_fraction` of the matched ones. Approximate:
        off by default. `semantic_reuse_threshold` is the token-match cosine,
        `semantic_recompute_layers` the first layers computed for every token,
        `semantic_store_mb` the reference store's bound (its KV is blocks of the paged
        cache, shared with the requests that reuse them unchanged: `semshare/sharing.py`).
    flexicache: FlexiCache (`moska/flexicache/`): per KV head, stable heads read only their
        top-K pages plus the recent ones at decode steps, unstable heads every page; "on"
        (= "k=32,recent=2,threshold=0.75,r=16,rerank=deferred,hold=on,slots=shared") or such
        items (or a FlexiCacheConfig).
        Approximate: off (None) by default; classified requests' older pages go to host
        memory (see README).

    Every field is reachable from the command line (`moska serve --help`): the CLI builds
    its engine flags from this class and a test fails when a field has none.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    memory_budget: str | None = None  # engine/memory.py: a size; on CPU the RAM to account
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_chunked_prefill: bool = True
    seed: int = 0
    library_root: str | None = None
    default_top_k_chunks: int = 8
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    shared_kv_ranks: int = 0  # distributed/shared_kv_engine.py: libraries' chunks there
    shared_kv_replica_slots: int = 0  # copies of hot chunks per shared rank (0: none)
    decode_context_parallel_size: int = 1  # distributed/kv_parallel_engine.py: KV over ranks
    helix: bool = False  # distributed/helix_engine.py: KV-parallel attention + TP FFN
    helix_microbatches: int = 1  # HOP-B micro-batches per Helix all-to-all (1: off)
    library_gpu_budget: str | None = None
    library_cpu_budget: str | None = None
    library_eviction: str = "lfu"
    library_miss_policy: str = "wait"
    library_prefetch: str = "next_layer"
    fp8_attention: str = "upcast"  # library/fp8_mma.py: upcast, mma or mma_qsplit
    semantic_reuse: bool = False
    semantic_reuse_threshold: float = 0.9
    semantic_recompute_fraction: float = 0.0  # measured: README "SemShareKV"
    semantic_recompute_layers: int = 1
    semantic_store_mb: int = 1024
    flexicache: str | FlexiCacheConfig | None = None  # moska/flexicache/: "on" or k=,threshold=

    # routing of library requests (moska.routing.RoutingPolicy); None: the policy's default
    routing_scorer: str | None = None
    routing_dense_layers: int | None = None
    routing_always_first: bool | None = None
    routing_always_last: bool | None = None
    routing_mass_threshold: float | None = None  # 0: a fixed k
    routing_page_size: int | None = None  # 0: score whole chunks
    routing_per_kv_head: bool | None = None

    def __post_init__(self) -> None:
        self.routing_policy  # noqa: B018 -- validates the routing fields (RoutingPolicyError)
        self.flexicache_config  # noqa: B018 -- validates the flexicache setting
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}"
            )
        if self.attention not in ("auto", "triton", "torch"):
            raise ValueError(f"attention must be auto, triton or torch, got {self.attention!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be positive")
        if not 0.05 <= self.gpu_memory_utilization <= 0.98:
            raise ValueError("gpu_memory_utilization must be between 0.05 and 0.98")
        if self.memory_budget is not None:
            from moska.engine.memory import parse_size

            parse_size(self.memory_budget, "memory_budget")  # ValueError naming the field
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.default_top_k_chunks < 1:
            raise ValueError("default_top_k_chunks must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be a positive number of ranks, "
                f"got {self.tensor_parallel_size}"
            )
        self.tier_config  # noqa: B018 -- validates the library tier fields (ValueError)
        if self.fp8_attention not in ("upcast", "mma", "mma_qsplit", "mma_qsplit_late"):
            raise ValueError(
                "fp8_attention must be upcast, mma, mma_qsplit or mma_qsplit_late, got "
                f"{self.fp8_attention!r}"
            )
        if self.shared_kv_ranks < 0:
            raise ValueError(f"shared_kv_ranks must be >= 0 (0: off), got {self.shared_kv_ranks}")
        if self.shared_kv_replica_slots < 0:
            raise ValueError(
                f"shared_kv_replica_slots must be >= 0 (0: no replicas), got "
                f"{self.shared_kv_replica_slots}"
            )
        if self.decode_context_parallel_size < 1:
            raise ValueError(
                "decode_context_parallel_size must be a positive number of ranks, got "
                f"{self.decode_context_parallel_size}"
            )
        if self.helix_microbatches < 1:
            raise ValueError(f"helix_microbatches must be >= 1, got {self.helix_microbatches}")
        if self.semantic_reuse:
            from moska.semshare.config import SemShareConfig

            SemShareConfig(  # raises ValueError naming the bad setting
                threshold=self.semantic_reuse_threshold,
                recompute_fraction=self.semantic_recompute_fraction,
                recompute_layers=self.semantic_recompute_layers,
                store_bytes=self.semantic_store_mb << 20,
            )
            if self.tensor_parallel_size > 1:
                raise ValueError("semantic_reuse does not run with tensor parallelism yet")

    @property
    def tier_config(self):
        """The libraries' TierConfig (moska.library.tiers), or None: wholly on the device."""
        from moska.library.tiers import TierConfig

        probe = TierConfig(
            gpu_budget="1.0" if self.library_gpu_budget is None else self.library_gpu_budget,
            cpu_budget=self.library_cpu_budget,
            eviction=self.library_eviction,
            miss_policy=self.library_miss_policy,
            prefetch=self.library_prefetch,
        )  # validates the fields even when tiers are off
        return probe if self.library_gpu_budget is not None else None

    @property
    def flexicache_config(self) -> FlexiCacheConfig | None:
        """The parsed `flexicache` setting (ValueError naming the bad item)."""
        if self.flexicache is None or isinstance(self.flexicache, FlexiCacheConfig):
            return self.flexicache
        return FlexiCacheConfig.parse(self.flexicache)

    @property
    def routing_policy(self):
        """The engine's default RoutingPolicy (a request's SamplingParams.routing wins)."""
        from moska.routing.policy import RoutingPolicy

        given = {
            "scorer": self.routing_scorer,
            "dense_layers": self.routing_dense_layers,
            "always_first": self.routing_always_first,
            "always_last": self.routing_always_last,
            "per_kv_head": self.routing_per_kv_head,
        }
        changes = {k: v for k, v in given.items() if v is not None}
        if self.routing_mass_threshold is not None:
            changes["mass_threshold"] = self.routing_mass_threshold or None
        if self.routing_page_size is not None:
            changes["page_size"] = self.routing_page_size or None
        return RoutingPolicy().replace(**changes)

    def check_device(self) -> None:
        """Raise DeviceUnavailableError when the asked-for device or attention backend
        cannot run on this machine: fail in one line before a model is loaded."""
        triton_help = "--attention triton needs a CUDA GPU; use --attention torch (or auto) on CPU"
        if self.device == "cpu":
            if self.attention == "triton":
                raise DeviceUnavailableError(triton_help)
            return
        import torch

        has_cuda = torch.cuda.is_available()
        if self.device.startswith("cuda") and not has_cuda:
            raise DeviceUnavailableError(
                f"--device {self.device} asks for CUDA but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        if self.attention == "triton" and not has_cuda:
            raise DeviceUnavailableError(triton_help)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
