"""Config parsing and loader failures: each error is typed and names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moska.model import (
    CorruptCheckpointError,
    MissingFileError,
    ModelConfig,
    ModelLoadError,
    UnsupportedArchitectureError,
    load_model,
)

WEIGHTS = "model.safetensors"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def test_errors_are_value_errors():
    for cls in (UnsupportedArchitectureError, MissingFileError, CorruptCheckpointError):
        assert issubclass(cls, ModelLoadError) and issubclass(cls, ValueError)


def test_missing_directory_and_config(tmp_path, llama_dir):
    with pytest.raises(MissingFileError, match="not found"):
        load_model(tmp_path / "nope")
    (llama_dir / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json"):
        load_model(llama_dir)


def test_missing_weights(llama_dir):
    (llama_dir / WEIGHTS).unlink()
    with pytest.raises(MissingFileError, match="model.safetensors"):
        load_model(llama_dir)


def test_missing_shard(llama_sharded_dir):
    shard = sorted(llama_sharded_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingFileError, match=shard.name):
        load_model(llama_sharded_dir)


def test_unsupported_architecture(llama_dir):
    edit_config(llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as e:
        load_model(llama_dir)
    assert "config.json" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_unsupported_rope_type(llama_dir):
    edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        load_model(llama_dir)


def test_invalid_config_values(llama_dir):
    edit_config(llama_dir, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="multiple of"):
        load_model(llama_dir)
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        load_model(llama_dir)


def test_bad_dtype_argument(llama_dir):
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(llama_dir, dtype="int8")


def test_garbage_safetensors(llama_dir):
    (llama_dir / WEIGHTS).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(llama_dir)


def test_truncated_safetensors(llama_dir):
    data = (llama_dir / WEIGHTS).read_bytes()
    (llama_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(llama_dir)


def test_missing_tensor(llama_dir):
    edit_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CorruptCheckpointError, match="model.layers.1.mlp.up_proj.weight") as e:
        load_model(llama_dir)
    assert WEIGHTS in str(e.value)


def test_missing_lm_head_untied(llama_dir):
    edit_weights(llama_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CorruptCheckpointError, match="lm_head.weight"):
        load_model(llama_dir)


def test_unexpected_tensor(llama_dir):
    edit_weights(llama_dir, lambda t: t.update({"model.layers.7.extra.weight": torch.ones(2)}))
    with pytest.raises(CorruptCheckpointError, match="unexpected tensor model.layers.7"):
        load_model(llama_dir)


def test_wrong_shape(llama_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    edit_weights(llama_dir, shrink)
    with pytest.raises(CorruptCheckpointError, match=r"k_proj.weight has shape \[8, 64\]") as e:
        load_model(llama_dir)
    assert WEIGHTS in str(e.value)


def test_ignored_inv_freq_and_tied_lm_head_copy(llama_dir):
    """Old checkpoints carry rotary inv_freq; tied ones sometimes also carry lm_head."""
    edit_config(llama_dir, tie_word_embeddings=True)

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()

    edit_weights(llama_dir, add)
    model = load_model(llama_dir).model
    assert model.lm_head is None


def test_no_tokenizer_gives_none(llama_dir):
    assert load_model(llama_dir).tokenizer is None


def test_config_legacy_keys():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "eos_token_id": [7, 9],
        "bos_token_id": 1,
    }
    c = ModelConfig.from_dict(raw)
    assert (c.num_kv_heads, c.head_dim, c.group_size) == (4, 16, 1)
    assert c.rope_theta == 500000.0 and c.rope_scaling.rope_type == "linear"
    assert c.torch_dtype == torch.bfloat16 and c.eos_token_ids == (7, 9)
    assert not c.qkv_bias and not c.qk_norm
    c = ModelConfig.from_dict({**raw, "rope_scaling": None, "architectures": ["Qwen2ForCausalLM"]})
    assert c.rope_scaling.rope_type == "default" and c.qkv_bias and not c.o_bias
    c = ModelConfig.from_dict({**raw, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert c.qk_norm and c.head_dim == 32 and c.q_size == 128
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_dict({k: v for k, v in raw.items() if k != "hidden_size"})
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act"):
        ModelConfig.from_dict({**raw, "hidden_act": "gelu"})
    with pytest.raises(ModelLoadError, match="original_max_position_embeddings"):
        ModelConfig.from_dict({**raw, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_config_is_frozen():
    c = ModelConfig("LlamaForCausalLM", 64, 2, 4, 2, 16, 128, 100)
    with pytest.raises(AttributeError):
        c.hidden_size = 3  # type: ignore[misc]


def test_copied_dir_still_loads(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "copy")
    assert load_model(tmp_path / "copy").config.num_layers == 2
