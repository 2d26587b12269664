"""KV-head compression (`moska convert kv-heads`): a checkpoint whose grouped heads are exact
low-rank images of each other converts losslessly (the fitted method; mean-pooling does not),
and the output is a plain GQA checkpoint that transformers loads with the same logits."""

from __future__ import annotations

import random

import pytest
import torch

from moska.model import DenseAttention, load_model
from moska.model.convert import ConvertError
from moska.model.convert_kv_heads import convert_kv_heads

transformers = pytest.importorskip("transformers")


def _mha_model(seed: int):
    """A random fp32 Llama with as many KV heads as query heads (4, head_dim 16)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, vocab_size=256, max_position_embeddings=512,
        initializer_range=0.1, attention_bias=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def _complex_scaled(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rows of a head [D, H] whose pairs (i, i + D/2), as complex numbers, times s [D/2]."""
    h = w.shape[0] // 2
    a, b = w[:h], w[h:]
    sr, si = s.real[:, None], s.imag[:, None]
    return torch.cat((sr * a - si * b, si * a + sr * b))


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """MHA (4 KV heads, D = 16) where head 1 is head 0's keys times a complex number per
    RoPE pair and head 0's values times a matrix (head 3 likewise of head 2): 2 heads hold
    everything, under every RoPE angle."""
    model = _mha_model(seed=3)
    d = model.config.head_dim
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
            wk, bk = k.weight.view(4, d, -1), k.bias.view(4, d, 1)
            wv, bv = v.weight.view(4, d, -1), v.bias.view(4, d, 1)
            for src, dst in ((0, 1), (2, 3)):  # biases too: they are part of the same map
                s = torch.complex(
                    torch.randn(d // 2, generator=g), torch.randn(d // 2, generator=g)
                )
                wk[dst], bk[dst] = _complex_scaled(wk[src], s), _complex_scaled(bk[src], s)
                m = torch.randn(d, d, generator=g) / d**0.5
                wv[dst], bv[dst] = m @ wv[src], m @ bv[src]
    path = tmp_path_factory.mktemp("kvh") / "mha"
    model.save_pretrained(path)
    return path


def _logits(path, ids):
    lm = load_model(path, dtype="float32")
    hidden = lm.model(torch.tensor(ids), torch.arange(len(ids)), DenseAttention())
    return lm.model.compute_logits(hidden)


def test_exactly_low_rank_kv_converts_losslessly(lowrank, tmp_path):
    rng = random.Random(0)
    calib = [[rng.randrange(256) for _ in range(48)] for _ in range(3)]
    ids = [rng.randrange(256) for _ in range(40)]
    want = _logits(lowrank, ids)
    fit = convert_kv_heads(lowrank, tmp_path / "fit", kv_heads=2, calibration=calib)
    assert fit.kv_heads_after == 2 and fit.calibration_tokens == 144
    assert min(fit.k_energy) > 1 - 1e-9 and min(fit.v_energy) > 1 - 1e-9
    convert_kv_heads(lowrank, tmp_path / "mean", kv_heads=2, method="mean")
    got = _logits(tmp_path / "fit", ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    mean_err = (_logits(tmp_path / "mean", ids) - want).abs().max()
    assert mean_err > 100 * (got - want).abs().max()
    assert mean_err > 1e-2
    # a plain GQA checkpoint: transformers reads it and agrees with moska
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fit", dtype=torch.float32)
    assert hf.config.num_key_value_heads == 2
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fit_beats_mean_pooling_on_a_generic_model(tmp_path):
    """Not exact here, but the fitted heads keep more of the output than mean-pooling."""
    path = tmp_path / "mha"
    _mha_model(seed=4).save_pretrained(path)
    rng = random.Random(1)
    calib = [[rng.randrange(256) for _ in range(64)] for _ in range(4)]
    ids = [rng.randrange(256) for _ in range(40)]
    want = _logits(path, ids)
    convert_kv_heads(path, tmp_path / "fit", kv_heads=2, calibration=calib)
    convert_kv_heads(path, tmp_path / "mean", kv_heads=2, method="mean")
    err_fit = (_logits(tmp_path / "fit", ids) - want).pow(2).mean()
    err_mean = (_logits(tmp_path / "mean", ids) - want).pow(2).mean()
    assert err_fit < err_mean


def test_bad_requests_are_refused(lowrank, checkpoints, tmp_path):
    path = lowrank
    with pytest.raises(ConvertError, match="divide"):
        convert_kv_heads(path, tmp_path / "a", kv_heads=3, method="mean")
    with pytest.raises(ConvertError, match="calibration"):
        convert_kv_heads(path, tmp_path / "b", kv_heads=2)
    with pytest.raises(ConvertError, match="k_norm"):
        convert_kv_heads(checkpoints["qwen3"][0], tmp_path / "c", kv_heads=1, method="mean")


def test_cli_kv_heads_to_mqa(tmp_path, capsys):
    from moska.cli import main
    from moska.model import ModelConfig
    from moska.model.default import default_model_dir

    text = tmp_path / "calib.txt"
    text.write_text("KV heads are merged in groups, fitted on this text. " * 20)
    out = tmp_path / "mqa"
    argv = ["convert", "kv-heads", str(default_model_dir()), "--kv-heads", "1"]
    assert main([*argv, "--calibration", str(text), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV heads 2 -> 1" in printed and "layer   3: energy kept K" in printed
    assert ModelConfig.from_file(out).num_kv_heads == 1
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):  # no calibration text for the fitted method
        main([*argv, "--out", str(tmp_path / "x")])
    assert "calibration" in capsys.readouterr().err
    # the mean-pooling baseline fits nothing: no per-layer energy lines (they were nan)
    assert main([*argv, "--method", "mean", "--out", str(tmp_path / "mean")]) == 0
    printed = capsys.readouterr().out
    assert "KV heads 2 -> 1 (mean:" in printed and "energy" not in printed and "nan" not in printed
    assert ModelConfig.from_file(tmp_path / "mean").num_kv_heads == 1
