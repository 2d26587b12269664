"""Tiny random Llama checkpoints (transformers save_pretrained) with moska's byte tokenizer."""

from __future__ import annotations

import json
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


STORE_DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    """A library "lib" of STORE_DOCS built once per module; tests copy it (see ``store``)."""
    from moska.library import build_library

    root = tmp_path_factory.mktemp("built")
    build_library(tiny_model, STORE_DOCS, "lib", root, chunk_size=32, progress=False)
    return root / "lib"


@pytest.fixture
def store(built, tmp_path) -> Path:
    """``tmp_path/store`` holding a fresh copy of the library "lib"."""
    root = tmp_path / "store"
    shutil.copytree(built, root / "lib")
    return root


def edit_manifest(directory: Path, edit) -> None:
    """Rewrite ``directory/manifest.json`` through ``edit(data)`` (tests damage libraries)."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(name="edit_manifest")
def edit_manifest_fixture():
    return edit_manifest
