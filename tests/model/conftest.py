"""Tiny random HF checkpoints (built with transformers, saved as safetensors) for model tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

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
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> (transformers class names, config overrides)
CASES: dict[str, tuple[str, str, dict]] = {
    "llama3_scaled": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}),
    "llama_gqa3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden_size": 96,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "attention_bias": True,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1e6}),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"head_dim": 32, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
}


def build_hf_model(case: str, seed: int = 0):
    """A random fp32 transformers model with non-trivial norm weights and biases."""
    config_cls, model_cls, overrides = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    model = getattr(transformers, model_cls)._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """case -> (directory, transformers model); built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for case in CASES:
        model = build_hf_model(case)
        model.save_pretrained(root / case)
        out[case] = (root / case, model)
    sharded = build_hf_model("qwen2", seed=1)
    sharded.save_pretrained(root / "qwen2_sharded", max_shard_size="40KB")
    out["qwen2_sharded"] = (root / "qwen2_sharded", sharded)
    return out


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    """A fresh (mutable) small Llama checkpoint directory."""
    build_hf_model("llama_mha").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def llama_sharded_dir(tmp_path) -> Path:
    build_hf_model("llama_mha").save_pretrained(tmp_path / "s", max_shard_size="40KB")
    return tmp_path / "s"
