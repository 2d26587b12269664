"""On CUDA, compiled Triton: `compile_watch` counts a kernel's first launch with a new
specialization and not a launch that hits its cache, and an engine step that compiled
says so (`LLMEngine.last_step_compiled`) while the same step again does not."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled Triton",
)


def test_a_new_specialization_counts_once():
    import triton
    import triton.language as tl

    from moska.engine import compile_watch

    assert compile_watch.install()

    @triton.jit
    def _scale(x, y, n, factor: tl.constexpr, block: tl.constexpr):
        offs = tl.program_id(0) * block + tl.arange(0, block)
        keep = offs < n
        tl.store(y + offs, tl.load(x + offs, mask=keep) * factor, mask=keep)

    x = torch.randn(1000, device="cuda")
    y = torch.empty_like(x)
    before = compile_watch.count()
    _scale[(8,)](x, y, x.numel(), 3.0, 128)
    first = compile_watch.count()
    _scale[(8,)](x, y, x.numel(), 3.0, 128)
    again = compile_watch.count()
    _scale[(8,)](x, y, x.numel(), 5.0, 128)  # a new constexpr: a new kernel
    torch.cuda.synchronize()
    assert torch.allclose(y, x * 5.0)
    assert (first - before, again - first, compile_watch.count() - again) == (1, 0, 1)


def test_an_engine_step_says_it_compiled():
    from moska import LLM, SamplingParams

    llm = LLM(None, device="cuda", dtype="float32", num_kv_blocks=64, max_model_len=1024,
              enforce_eager=True)  # fmt: skip
    from moska.engine import compile_watch

    engine, seen, counts = llm.engine, [], []
    for rid in ("a", "b"):  # the same shapes twice: only the first pass may compile
        counts.append(compile_watch.count())
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request(rid, [1, 2, 3, 4, 5], params)
        while engine.has_unfinished_requests():
            engine.step()
            seen.append(engine.last_step_compiled)
    half = len(seen) // 2
    # kernels another test compiled in this process are cached: a first pass compiles only
    # if it is the first to run them, and then a step says so
    assert any(seen[:half]) == (counts[1] > counts[0]), (seen, counts)
    assert not any(seen[half:]), seen
