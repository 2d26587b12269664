"""MLKV (layers share KV): config formats, the converter, loading, parity with the plain
PyTorch reference (`reference_logits`), KV memory, and the engine paths that touch KV
(paged cache, chunked prefill, prefix caching, libraries)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moska import LLM, SamplingParams
from moska.cli import main
from moska.library.loaded import load_library
from moska.model import DenseAttention, ModelConfig, ModelLoadError, load_model
from moska.model.convert import ConvertError
from moska.model.convert_mlkv import convert_mlkv
from moska.model.default import default_model_dir
from moska.model.reference import greedy_generate, reference_logits

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
}


# ---------------------------------------------------------------- config formats


def test_three_spellings_give_one_map():
    ours = ModelConfig.from_dict({**BASE, "kv_source_layers": [0, 0, 2, 2, 2, 5, 5, 5]})
    mlkv = ModelConfig.from_dict({**BASE, "num_key_value_layers": 3})  # 0, int(8/3), int(16/3)
    names = [None, "model.layers.0.self_attn.attn", None, "model.layers.2.self_attn.attn"]
    names += ["model.layers.2.self_attn.attn", None, "model.layers.5.self_attn.attn", 5]
    vllm = ModelConfig.from_dict({**BASE, "kv_sharing_target_layer_name": names})
    as_dict = {f"model.layers.{i}.self_attn.attn": n for i, n in enumerate(names) if n}
    vllm_dict = ModelConfig.from_dict({**BASE, "kv_sharing_target_layer_name": as_dict})
    for c in (ours, mlkv, vllm, vllm_dict):
        assert c.kv_source_layers == (0, 0, 2, 2, 2, 5, 5, 5)
        assert c.kv_layers == (0, 2, 5) and c.num_kv_layers == 3
        assert c.kv_slots == (0, 0, 1, 1, 1, 2, 2, 2)
    plain = ModelConfig.from_dict(BASE)
    assert plain.kv_source_layers == () and plain.num_kv_layers == 8
    assert plain.kv_slots == tuple(range(8))
    assert (
        ours.kv_bytes_per_token(torch.bfloat16) * 8 == plain.kv_bytes_per_token(torch.bfloat16) * 3
    )
    # every layer its own source is no sharing at all
    assert ModelConfig.from_dict({**BASE, "kv_source_layers": list(range(8))}).num_kv_layers == 8


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"kv_source_layers": [0, 0, 3, 3, 4, 4, 6, 6]}, "earlier layer"),  # 2 -> 3 is later
        ({"kv_source_layers": [0, 0, 1, 3, 3, 3, 3, 3]}, "point layer 2 at 0"),  # chain
        ({"kv_source_layers": [0, 0, 2]}, "one source layer per layer"),
        ({"kv_source_layers": 2}, "list"),
        ({"num_key_value_layers": 9}, "[1, 8]"),
        ({"kv_sharing_target_layer_name": {"model.layers.3.attn": "lm_head"}}, "names no layer"),
        ({"kv_source_layers": [0] * 8, "num_key_value_layers": 2}, "keep one"),
    ],
)
def test_bad_maps_are_refused_with_a_reason(extra, words):
    with pytest.raises(ModelLoadError, match="config.json") as e:
        ModelConfig.from_dict({**BASE, **extra})
    assert words in str(e.value)


# ---------------------------------------------------------------- converter + loader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny model (4 layers, with tokenizer) and its share-2 variants."""
    root = tmp_path_factory.mktemp("mlkv")
    src = default_model_dir()
    out = {"orig": src}
    for merge in ("mean", "first"):
        out[merge] = root / merge
        convert_mlkv(src, out[merge], share=2, merge=merge)
    return out


def test_converter_merges_the_groups_kv(tiny):
    orig = load_file(str(tiny["orig"] / "model.safetensors"))
    cfg = json.loads((tiny["mean"] / "config.json").read_text())
    assert cfg["kv_source_layers"] == [0, 0, 2, 2]
    assert (tiny["mean"] / "tokenizer.json").is_file()
    for merge in ("mean", "first"):
        conv = load_file(str(tiny[merge] / "model.safetensors"))
        for src, other in ((0, 1), (2, 3)):
            for proj in ("k_proj", "v_proj"):
                a = orig[f"model.layers.{src}.self_attn.{proj}.weight"]
                b = orig[f"model.layers.{other}.self_attn.{proj}.weight"]
                want = (a + b) / 2 if merge == "mean" else a
                got = conv[f"model.layers.{src}.self_attn.{proj}.weight"]
                torch.testing.assert_close(got, want)
                assert f"model.layers.{other}.self_attn.{proj}.weight" not in conv
        assert set(orig) - set(conv) == {
            f"model.layers.{i}.self_attn.{p}.weight" for i in (1, 3) for p in ("k_proj", "v_proj")
        }


def test_converter_refuses_bad_requests(tiny, tmp_path):
    with pytest.raises(ConvertError, match="--share"):
        convert_mlkv(tiny["orig"], tmp_path / "a", share=1, merge="mean")
    with pytest.raises(ConvertError, match="already shares"):
        convert_mlkv(tiny["mean"], tmp_path / "b", share=2, merge="mean")
    with pytest.raises(ConvertError, match="not empty"):
        convert_mlkv(tiny["orig"], tiny["mean"].parent, share=2, merge="mean")


def test_cli_convert(tiny, tmp_path, capsys):
    assert main(["convert", "mlkv", str(tiny["orig"]), "--share", "4", "--merge", "first",
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert "KV bytes per token" in capsys.readouterr().out
    assert ModelConfig.from_file(tmp_path / "o").kv_source_layers == (0, 0, 0, 0)
    with pytest.raises(SystemExit) as e:
        main(["convert", "mlkv", str(tiny["orig"]), "--share", "9", "--out", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "--share must be in [2, 4]" in capsys.readouterr().err


def test_loader_builds_q_only_sharers_and_ignores_stale_kv(tiny, tmp_path):
    lm = load_model(tiny["mean"])
    c = lm.config
    for i, layer in enumerate(lm.model.layers):
        rows = layer.self_attn.qkv_proj.weight.shape[0]
        assert rows == (c.q_size + 2 * c.kv_size if i in (0, 2) else c.q_size)
    # a checkpoint marked MLKV that still carries every layer's k/v: they are ignored
    stale = tmp_path / "stale"
    stale.mkdir()
    for f in tiny["orig"].iterdir():
        if f.is_file():
            (stale / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**cfg, "kv_source_layers": [0, 0, 2, 2]}))
    first = load_model(stale)
    ref = load_model(tiny["first"])
    for a, b in zip(first.model.state_dict().values(), ref.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_qwen3_and_bias_checkpoints_convert_and_match_reference(checkpoints, tmp_path):
    """k_norm (Qwen3) and k/v biases (Qwen2, attention_bias) are merged with k/v."""
    for case in ("qwen3", "qwen2", "llama_gqa3"):
        out = tmp_path / case
        convert_mlkv(checkpoints[case][0], out, share=2, merge="mean")
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
        assert not any(n.startswith("model.layers.1.self_attn.k_") for n in names)
        _check_parity(out, list(range(3, 40)))


# ---------------------------------------------------------------- parity with the reference


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _check_parity(path, ids: list[int]) -> torch.Tensor:
    lm = load_model(path, dtype="float32")
    hidden = lm.model(torch.tensor(ids), torch.arange(len(ids)), DenseAttention())
    got = lm.model.compute_logits(hidden).double()
    want = reference_logits(lm.config, _tensors(path), ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    return want


def test_model_matches_the_reference(tiny):
    ids = [random.Random(0).randrange(256) for _ in range(48)]
    orig = _check_parity(tiny["orig"], ids)
    mean = _check_parity(tiny["mean"], ids)
    first = _check_parity(tiny["first"], ids)
    # the sharing is real: the variants compute something else than the original and each other
    assert (orig - mean).abs().max() > 1e-2 and (mean - first).abs().max() > 1e-2


# ---------------------------------------------------------------- engine paths


@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory):
    kw = {"device": "cpu", "dtype": "float32", "attention": "torch", "num_kv_blocks": 64}
    kw["block_size"] = 16
    root = tmp_path_factory.mktemp("libs")
    return {
        "orig": LLM(str(tiny["orig"]), **kw),
        "mean": LLM(
            str(tiny["mean"]),
            **kw,
            library_root=str(root),
            max_num_batched_tokens=24,  # 40-token prompts prefill in two steps
            max_num_seqs=8,
            enable_prefix_caching=True,
        ),
    }


def test_kv_cache_holds_source_layers_only(engines):
    per_token = {}
    for name, llm in engines.items():
        cache = llm.engine.runner.cache
        per_token[name] = cache.nbytes // (cache.num_blocks * cache.block_size)
        assert cache.k.shape[0] == llm.engine.loaded.config.num_kv_layers
    c = engines["orig"].engine.loaded.config
    assert per_token["orig"] == 2 * 4 * c.kv_size * 4  # K and V, 4 layers, fp32
    assert per_token["mean"] * 2 == per_token["orig"]  # share 2: half the bytes per token
    assert per_token["mean"] == engines["mean"].engine.loaded.config.kv_bytes_per_token(
        torch.float32
    )


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _run(engine, rid: str, prompt: list[int], params: SamplingParams):
    """One request alone through the engine: its final output (which carries
    num_cached_tokens) and the number of steps it took."""
    engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        steps += 1
    return final, steps


def test_engine_chunked_prefill_and_prefix_cache_match_reference(engines, tiny):
    llm = engines["mean"]
    model = llm.engine.loaded.model
    shared = _prompt(40, 1)  # two full 16-token blocks to hit in the cache, then more
    prompts = [shared + _prompt(5, 2), shared + _prompt(7, 3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    (first, steps), (second, _) = (
        _run(llm.engine, f"p{i}", p, params) for i, p in enumerate(prompts)
    )
    assert steps > params.max_tokens  # the 45-token prompt was prefilled in two steps
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 32  # its prefix blocks came from the cache
    for p, o in zip(prompts, (first, second)):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 8)
    # logprobs of the first token against the float64 reference of the converted checkpoint
    ref = torch.log_softmax(reference_logits(llm.engine.loaded.config, _tensors(tiny["mean"]),
                                             prompts[1])[-1], -1)  # fmt: skip
    for tok, lp in second.outputs[0].logprobs[0].top.items():
        assert abs(lp - ref[tok].item()) < 1e-4


def test_library_stores_source_layers_and_reads_them(engines, tiny):
    llm = engines["mean"]
    docs = [("a.md", "MLKV shares one KV across layers. " * 4), ("b.md", "Fewer bytes.")]
    manager = llm.engine.libraries
    info = manager.build("mlkv-docs", docs, chunk_size=32, mode="prefix")
    assert info.num_layers == 4
    built = manager.get("mlkv-docs")
    loaded = load_library(manager.root, "mlkv-docs", manager.fingerprint, progress=False)
    for lib in (built, loaded):
        assert lib.num_kv_layers == 2 and len(lib.k_pools) == len(lib.routing) == 2
    assert loaded.manifest.model.num_kv_layers == 2
    files = sorted(p.name for p in (manager.root / "mlkv-docs").iterdir())
    assert sum(f.startswith("layer_") for f in files) == 2, files
    for a, b in zip(built.k_pools + built.v_pools, loaded.k_pools + loaded.v_pools):
        torch.testing.assert_close(a, b)
    lib_ids = loaded.token_ids.tolist()
    prompt = _prompt(6, 4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt], params, library="mlkv-docs", top_k_chunks=10**6)[0]
    assert out.outputs[0].token_ids == greedy_generate(llm.engine.loaded.model, lib_ids + prompt, 6)
