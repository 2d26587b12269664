"""moska's decoder vs transformers on the same checkpoint: prefill, decode steps, greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from moska.model import DenseAttention, greedy_generate, load_model

# Must match the checkpoints built in conftest.py (checked below).
ALL_CASES = [
    "llama3_scaled",
    "llama_tied",
    "llama_mha",
    "llama_gqa3",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_sharded",
]
PROMPT_LEN, DECODE_STEPS, GEN_TOKENS = 24, 6, 12


def test_all_cases_covered(checkpoints):
    assert sorted(checkpoints) == sorted(ALL_CASES)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", ALL_CASES)
@torch.inference_mode()
def test_logits_match_transformers(checkpoints, case):
    path, hf = checkpoints[case]
    loaded = load_model(path)
    model, config = loaded.model, loaded.config
    assert model.dtype == torch.float32
    gen = torch.Generator().manual_seed(123)
    prompt = torch.randint(3, config.vocab_size, (PROMPT_LEN,), generator=gen)
    steps = torch.randint(3, config.vocab_size, (DECODE_STEPS,), generator=gen)

    ref = hf(prompt[None], use_cache=True)
    past = ref.past_key_values
    attn = DenseAttention(config.sm_scale)
    hidden = model(prompt, torch.arange(PROMPT_LEN), attn)  # [T, H]
    logits = model.compute_logits(hidden)  # [T, V]
    assert logits.dtype == torch.float32 and logits.shape == (PROMPT_LEN, config.vocab_size)
    assert rel_err(logits, ref.logits[0].float()) < 1e-4

    for i, tok in enumerate(steps.tolist()):
        ref = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = ref.past_key_values
        pos = torch.tensor([PROMPT_LEN + i])
        got = model.compute_logits(model(torch.tensor([tok]), pos, attn))
        assert rel_err(got, ref.logits[0].float()) < 1e-4, f"decode step {i}"
    assert attn.seq_len(config.num_layers - 1) == PROMPT_LEN + DECODE_STEPS


@pytest.mark.parametrize("case", ["llama3_scaled", "llama_tied", "qwen3", "qwen2_sharded"])
@torch.inference_mode()
def test_greedy_generation_matches_transformers(checkpoints, case):
    path, hf = checkpoints[case]
    model = load_model(path).model
    prompt = torch.randint(3, 256, (10,), generator=torch.Generator().manual_seed(7))
    ref = hf.generate(
        prompt[None],
        attention_mask=torch.ones(1, 10, dtype=torch.long),
        do_sample=False,
        max_new_tokens=GEN_TOKENS,
        min_new_tokens=GEN_TOKENS,
    )[0, 10:].tolist()
    assert greedy_generate(model, prompt.tolist(), GEN_TOKENS) == ref


def test_llama3_scaling_changes_frequencies(checkpoints):
    """Guard that the scaled case really exercises llama3 scaling (else parity proves little)."""
    from moska.model.layers import rope_inv_freq

    config = load_model(checkpoints["llama3_scaled"][0]).config
    assert config.rope_scaling.rope_type == "llama3"
    plain = rope_inv_freq(config.head_dim, config.rope_theta, type(config.rope_scaling)())
    scaled = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert not torch.allclose(plain, scaled)
    assert (scaled[1:] == plain[1:] / 8).all() and plain[0] != scaled[0] != plain[0] / 8


def test_sharded_index_is_used(checkpoints):
    path = checkpoints["qwen2_sharded"][0]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = load_model(path).config
    assert config.qkv_bias and not config.o_bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16"])
@torch.inference_mode()
def test_low_precision_load(checkpoints, dtype):
    path, hf = checkpoints["qwen3"]
    model = load_model(path, dtype=dtype).model
    want = torch.bfloat16 if dtype == "bf16" else dtype
    assert all(p.dtype == want for p in model.parameters())
    assert model.rotary.inv_freq.dtype == torch.float32
    prompt = torch.arange(3, 19)
    hidden = model(prompt, torch.arange(16), DenseAttention())
    assert hidden.dtype == want
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = hf(prompt[None]).logits[0]
    assert rel_err(logits, ref) < 0.1


def test_auto_dtype_follows_checkpoint(tmp_path, checkpoints):
    _path, hf = checkpoints["llama_mha"]
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf.to(torch.float32)
    loaded = load_model(tmp_path / "bf16", dtype="auto")
    assert loaded.config.torch_dtype == torch.bfloat16
    assert loaded.model.dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16", dtype="float32").model.dtype == torch.float32
