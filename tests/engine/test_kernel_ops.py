"""One kernel table per engine (moska/kernel_ops.py): attention "torch" launches no Triton
kernel anywhere (library build, routing, grouped and paged attention, norms, RoPE, MLP), even
where Triton could run (the interpreter, TRITON_INTERPRET=1 from conftest)."""

import pytest
import torch

from moska import LLM, SamplingParams
from moska.kernel_ops import kernel_ops
from moska.model.reference import DenseAttention

DOCS = [("a.md", "Shared context read by many requests, split into chunks. " * 4)]


def test_torch_table_runs_no_triton(tmp_path, launches):
    llm = LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=128,
        max_model_len=512,
        library_root=str(tmp_path),
    )
    runner = llm.engine.runner
    assert runner.ops.name == "torch" and llm.engine.loaded.model.kernels is runner.ops
    llm.engine.libraries.build("docs", DOCS, chunk_size=16, mode="prefix")
    assert llm.engine.libraries.get("docs").num_chunks >= 3
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    routed = llm.generate([[5, 6, 7, 8]], params, library="docs", top_k_chunks=2)
    plain = llm.generate([[9, 10, 11]], params)
    assert len(routed[0].outputs[0].token_ids) == 3 and len(plain[0].outputs[0].token_ids) == 3
    assert launches == []

    # the hook sees launches: the same model under the Triton table launches its layer kernels
    model = llm.engine.loaded.model
    ids = torch.tensor([3, 4, 5, 6])
    pos = torch.arange(4)
    with torch.inference_mode():  # a fresh DenseAttention per pass: it keeps its KV
        want = model(ids, pos, DenseAttention(model.config.sm_scale))
        model.kernels = kernel_ops("triton")
        try:
            got = model(ids, pos, DenseAttention(model.config.sm_scale))
        finally:
            model.kernels = runner.ops
    assert {"_rms_norm_kernel", "_rope_kernel", "_silu_and_mul_kernel"} <= set(launches)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_auto_resolves_by_device():
    assert kernel_ops("auto", "cpu").name == "torch"
    assert kernel_ops("auto", torch.device("cuda", 0)).name == "triton"
    assert kernel_ops("torch", "cuda").triton_routing is False
    with pytest.raises(ValueError, match="triton"):
        kernel_ops("cuda")
