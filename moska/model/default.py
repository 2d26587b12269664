"""The built-in tiny model: a Llama-architecture checkpoint made deterministically from a
seed and saved once in Hugging Face format, so it goes through the ordinary loader.

Its weights are random: the text it writes is not meaningful. It exists so that
`moska generate` and `moska serve` work on a fresh machine with nothing downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moska.paths import moska_home

DEFAULT_MODEL_NAME = "moska-tiny"
_VERSION = 1
_SEED = 1234
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "float32",
}


def default_model_dir() -> Path:
    """The directory of the built-in model, created on first use."""
    path = moska_home() / "models" / f"{DEFAULT_MODEL_NAME}-v{_VERSION}"
    if not (path / "config.json").exists():
        _write_default_model(path)
    return path


def _byte_to_char() -> list[str]:
    """Byte-level BPE's reversible map from each byte to a printable character: printable
    Latin-1 bytes stand for themselves, the rest are moved to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_byte_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_byte_to_char())}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _weights(seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    c = CONFIG
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    hq, hkv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    out = {"model.embed_tokens.weight": w(c["vocab_size"], h, std=1.0)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = w(hq, h, std=h**-0.5)
        out[p + "self_attn.k_proj.weight"] = w(hkv, h, std=h**-0.5)
        out[p + "self_attn.v_proj.weight"] = w(hkv, h, std=h**-0.5)
        out[p + "self_attn.o_proj.weight"] = w(h, hq, std=hq**-0.5)
        out[p + "mlp.gate_proj.weight"] = w(inter, h, std=h**-0.5)
        out[p + "mlp.up_proj.weight"] = w(inter, h, std=h**-0.5)
        out[p + "mlp.down_proj.weight"] = w(h, inter, std=inter**-0.5)
        out[p + "input_layernorm.weight"] = 1.0 + w(h, std=0.1)
        out[p + "post_attention_layernorm.weight"] = 1.0 + w(h, std=0.1)
    out["model.norm.weight"] = 1.0 + w(h, std=0.1)
    out["lm_head.weight"] = w(c["vocab_size"], h, std=h**-0.5 * 4)
    return {k: v.contiguous() for k, v in out.items()}


def _write_default_model(path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        save_file(_weights(_SEED), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        _write_byte_tokenizer(tmp)
        (tmp / "README.md").write_text(
            "moska's built-in tiny model: random weights from a fixed seed. Its text is "
            "not meaningful.\n"
        )
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():  # lost a race with nothing to show for it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
