"""Helpers of the tensor-parallel tests: tiny checkpoints, a forward through an engine's
model, the devices to run on (CPU with gloo; CUDA where present, several ranks on one GPU
through gloo, or NCCL with a GPU per rank)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]


def build_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random fp32 Llama checkpoint (config.json + model.safetensors, HF names) with
    non-trivial norms and biases. Written directly: importing transformers costs seconds."""
    from safetensors.torch import save_file

    c = {**BASE, **overrides}
    h, hq, hkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d, inter, v = h // hq, c["intermediate_size"], c["vocab_size"]
    bias = c.get("attention_bias", False)
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return torch.rand(n, generator=g) + 0.5

    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": norm(h)}
    if not c.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)):
            t[p + f"self_attn.{name}.weight"] = w(rows, h)
            if bias:
                t[p + f"self_attn.{name}.bias"] = w(rows, std=0.5)
        t[p + "self_attn.o_proj.weight"] = w(h, hq * d)
        if bias:
            t[p + "self_attn.o_proj.bias"] = w(h, std=0.5)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        **c,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def two_docs(seed: int, n: int = 96) -> list[tuple[str, list[int]]]:
    """A library's documents: n random token ids split into two files."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (n,), generator=g).tolist()
    return [("a.txt", ids[: n // 2]), ("b.txt", ids[n // 2 :])]


def engine_kwargs(device: str, **extra) -> dict:
    # no prefix caching: prefill_logits writes blocks the block manager does not know of
    return {"device": device, "dtype": "float32", "num_kv_blocks": 64, "enforce_eager": True,
            "enable_prefix_caching": False, **extra}  # fmt: skip


def prefill_inputs(prompts: list[list[int]], bs: int, dev, offset: int = 0):
    """(token ids, positions, AttentionMetadata) of one prefill forward of `prompts` in KV
    blocks 0.. in order, positions from `offset` (a library's position_offset after it)."""
    from moska.attention.metadata import AttentionMetadata

    ids, pos, slots, cu, lens, tables, block = [], [], [], [0], [], [], 0
    width = max(-(-len(p) // bs) for p in prompts)
    for p in prompts:
        n = -(-len(p) // bs)
        table = list(range(block, block + n))
        block += n
        ids += p
        pos += range(offset, offset + len(p))
        slots += [table[i // bs] * bs + i % bs for i in range(len(p))]
        cu.append(len(ids))
        lens.append(len(p))
        tables.append(table + [0] * (width - n))

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype, device=dev)

    meta = AttentionMetadata(
        t(slots, torch.int64), t(cu, torch.int32), t(lens, torch.int32), t(tables, torch.int32),
        decode_only=False,
    )  # fmt: skip
    return t(ids, torch.int64), t(pos, torch.int64), meta


@torch.inference_mode()
def prefill_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """Logits [sum of prompt lengths, V] fp32 of one prefill forward of `prompts` through
    the engine's model and paged attention (blocks 0.. in order; the engine must be idle)."""
    runner = engine.runner
    ids, pos, meta = prefill_inputs(prompts, engine.config.block_size, runner.device)
    hidden = runner.model(ids, pos, runner.attention.bind(meta))
    return runner.model.compute_logits(hidden)


def greedy_library(engine, prompts, name: str, max_tokens: int, top_k: int | None, routing=None):
    """Greedy completions of `prompts` reading library `name`, run together."""
    return greedy(engine, prompts, max_tokens, library=name, top_k_chunks=top_k, routing=routing)


def greedy(engine, prompts: list[list[int]], max_tokens: int, routing=None, **request):
    """Greedy completions of `prompts` run together through engine.step() (`request`:
    add_request's library arguments)."""
    from moska.engine.sampling_params import SamplingParams

    tag = "lib" if request.get("library") else "g"
    for i, p in enumerate(prompts):
        params = SamplingParams(
            max_tokens=max_tokens + i, temperature=0.0, ignore_eos=True, routing=routing
        )
        engine.add_request(f"{tag}{i}", p, params, **request)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class _EagerGraph:
    """Stands for a torch.cuda.CUDAGraph on CPU: replay() runs the captured forward again,
    eagerly, collectives included (a real replay runs the captured ones)."""

    def __init__(self, run) -> None:
        self.replay = run


def fake_capture(self, b: int, spec):
    """DecodeGraphs._capture without CUDA (test_tp_graphs.py, test_tp_graphs_engine.py): the
    same static buffers, padding, bound attention and warm-up (under `_model_context`, as the
    real capture); a replay runs the recorded forward eagerly, collectives included."""
    from moska.attention.metadata import AttentionMetadata
    from moska.engine.cuda_graphs import _Graph

    assert spec is None
    i64, i32 = torch.int64, torch.int32
    g = _Graph(
        graph=None,  # type: ignore[arg-type]
        ids=torch.empty(b, dtype=i64),
        pos=torch.empty(b, dtype=i64),
        slots=torch.empty(b, dtype=i64),
        seq_lens=torch.empty(b, dtype=i32),
        tables=torch.empty((b, self.max_blocks), dtype=i32),
        hidden=None,
        group=None,
    )
    self._pad(g, 0)
    meta = AttentionMetadata(g.slots, torch.arange(b + 1, dtype=i32), g.seq_lens, g.tables,
                             decode_only=True)  # fmt: skip
    bound = self.attention.bind(meta)
    with self._model_context():
        g.hidden = self.model(g.ids, g.pos, bound).clone()  # the warm-up

    def run() -> None:
        with self._model_context():
            g.hidden.copy_(self.model(g.ids, g.pos, bound))

    g.graph = _EagerGraph(run)  # type: ignore[assignment]
    g.keep = [meta, bound]
    return g


def nccl_path(monkeypatch=None) -> None:
    """StepChannel's NCCL branch on gloo: a FORWARD's payload and a LOGITS_ROWS' rows follow
    on the model group instead of riding in the control message (Collectives'
    stage_through_host off; CPU tensors are never staged anyway)."""
    from moska.distributed.comm import Collectives

    real = Collectives.__init__

    def init(self, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        self.stage_through_host = False

    if monkeypatch is None:
        Collectives.__init__ = init  # type: ignore[method-assign]
    else:
        monkeypatch.setattr(Collectives, "__init__", init)


def fake_graphs_worker(rdv, rank, parent, *args) -> None:
    """worker.run_worker with decode graphs on CPU (fake_capture) and StepChannel's NCCL
    branch (nccl_path) when rank 0's MOSKA_TEST_FAKE_GRAPHS=1 reached it (Rendezvous.env;
    the forkserver's own environment lacks it): the engine-level twin of the NCCL graph
    test."""
    from moska.distributed import worker
    from moska.engine.cuda_graphs import DecodeGraphs
    from moska.engine.runner import ModelRunner

    def use_graphs(self, kv_parallel) -> bool:
        return os.environ.get("MOSKA_TEST_FAKE_GRAPHS") == "1"

    ModelRunner._use_graphs = use_graphs  # type: ignore[method-assign]
    DecodeGraphs._capture = fake_capture  # type: ignore[method-assign]
    nccl_path()
    worker.run_worker(rdv, rank, parent, *args)


def kill_rank_mid_step(engine, rank: int, within_s: float = 10.0) -> tuple[Exception, float]:
    """SIGKILL `rank` of `engine` (a request decoding), then step until the engine names
    it: its RankFailedError, asserted within `within_s` of the kill, and the kill's
    monotonic time. A step that hangs fails on the test's timeout."""
    from moska.distributed.errors import RankFailedError

    os.kill(engine.dist.worker_pids[rank], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RankFailedError, match=f"rank {rank}") as info:
        while time.monotonic() - t0 < 30:
            engine.step()
    assert time.monotonic() - t0 < within_s
    assert info.value.rank == rank
    return info.value, t0


class EnginePair:
    """A module's (reference, distributed engine), unpacked as a pair by each test. A test
    that kills a rank ends the module's distributed engine; it is written last in its file,
    but pytest-xdist's worksteal may hand a worker the module's tests out of file order (a
    test taken from a busy worker after the kill), so an engine found failed is shut down
    and started again here instead of failing that later test."""

    def __init__(self, ref, start) -> None:
        self.ref, self._start = ref, start
        self.engine = start()

    def __iter__(self):
        if self.engine.dist is not None and self.engine.dist.failure is not None:
            self.engine.shutdown()
            self.engine = self._start()
        return iter((self.ref, self.engine))

    def shutdown(self) -> None:
        self.engine.shutdown()
