"""Tiny random Llama checkpoints (transformers save_pretrained) with moska's byte tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "vocab_size": 261,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "initializer_range": 0.2,
}


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    transformers = pytest.importorskip("transformers")
    from moska.model.default import default_model_dir

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    src = default_model_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from moska.model import load_model

    return load_model(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """Same dims as tiny_model, different config (rope_theta): another checkpoint."""
    from moska.model import load_model

    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "other", seed=1, rope_theta=500.0)
    return load_model(path, dtype="float32")
