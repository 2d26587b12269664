"""Libraries past the model's trained context: a prefix-mode build that does not fit is
refused before any prefill (typed error, HTTP 400 naming the field, CLI one line + exit 2);
a position-independent library of more tokens than the context builds and serves; its
chunk sink and APE tempering match plain-PyTorch references."""

from __future__ import annotations

import json
import math
import shutil

import httpx
import pytest
import torch

from moska.library import build_in_memory
from moska.library.positions import (
    IndependentOptions,
    LibraryTooLongError,
    check_fits_context,
    request_room,
)
from moska.model import DenseAttention

CONTEXT = 128  # the small checkpoint's max_position_embeddings
LONG_TEXT = "def f(x):\n    return x + 1\n" * 20  # 540 byte tokens: > 4x the context


@pytest.fixture(scope="module")
def small_ctx_dir(tmp_path_factory):
    """The built-in tiny model (random weights) with a context of CONTEXT positions."""
    from moska.model.default import default_model_dir

    path = tmp_path_factory.mktemp("ckpt") / "small-context"
    shutil.copytree(default_model_dir(), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return path


@pytest.fixture(scope="module")
def small_model(small_ctx_dir):
    from moska.model import load_model

    return load_model(small_ctx_dir, dtype="float32")


@pytest.fixture(scope="module")
def engine(small_ctx_dir, tmp_path_factory):
    from moska.engine.llm_engine import LLMEngine

    root = tmp_path_factory.mktemp("libs")
    return LLMEngine.from_model(
        str(small_ctx_dir), device="cpu", library_root=str(root), num_kv_blocks=64
    )


def test_check_fits_context_limits():
    room = request_room(CONTEXT)
    check_fits_context("prefix", CONTEXT - room, 32, CONTEXT)  # fits exactly
    with pytest.raises(LibraryTooLongError) as e:
        check_fits_context("prefix", CONTEXT - room + 1, 32, CONTEXT)
    assert e.value.field == "mode" and "--mode independent" in str(e.value)
    check_fits_context("independent", 10 * CONTEXT, CONTEXT - room - 1, CONTEXT, prefix_len=1)
    with pytest.raises(LibraryTooLongError) as e:
        check_fits_context("independent", 10 * CONTEXT, CONTEXT - room, CONTEXT, prefix_len=1)
    assert e.value.field == "chunk_size"
    check_fits_context("prefix", 10**9, 32, None)  # unknown context: nothing to check


def test_prefix_build_past_context_is_refused_before_prefill(small_model):
    calls = []
    with pytest.raises(LibraryTooLongError, match="--mode independent"):
        build_in_memory(
            small_model,
            [("a.py", LONG_TEXT)],
            "long",
            chunk_size=32,
            mode="prefix",
            progress=False,
            on_progress=lambda done, total: calls.append(done),
        )
    assert calls == []  # refused before the first piece


def dense_kv(model, ids):
    attn = DenseAttention()
    with torch.inference_mode():
        model.forward(torch.tensor(ids), torch.arange(len(ids)), attn)
    return attn.k, attn.v


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_chunk_sink_pools_match_reference(small_model):
    """Each chunk's rows equal a dense prefill of [BOS] + chunk with the BOS row dropped."""
    text = "".join(chr(97 + (i * 7) % 26) for i in range(150))  # fresh, non-repeating
    lib, _ = build_in_memory(
        small_model,
        [("a", text), ("b", text[::-1][:50])],
        "sink",
        chunk_size=40,
        mode="independent",
        progress=False,
        independent=IndependentOptions(chunk_sink=True),
    )
    bos = small_model.tokenizer.bos_token_id
    assert lib.manifest.chunk_sink and lib.position_offset == 41
    assert lib.num_tokens > CONTEXT  # more tokens than the model's context
    for c in lib.chunks:
        ids = [bos] + lib.token_ids[c.start : c.end].tolist()
        k_ref, v_ref = dense_kv(small_model.model, ids)
        for layer in range(lib.num_kv_layers):
            assert rel_err(lib.k_pools[layer][c.start : c.end], k_ref[layer][1:]) < 1e-4
            assert rel_err(lib.v_pools[layer][c.start : c.end], v_ref[layer][1:]) < 1e-4


def reference_logits(model, lib, prompt, temperature, log_scale, sm_scale):
    """Plain PyTorch: each prompt token attends to every library row (logits / T, weight
    times S) and causally to the prompt, at positions from the library's offset."""

    def attn(layer, q, k, v):
        T, Hq, _ = q.shape
        G = Hq // k.shape[1]
        kp = lib.k_pools[layer].float().repeat_interleave(G, 1)
        vp = lib.v_pools[layer].float().repeat_interleave(G, 1)
        kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        s_lib = torch.einsum("thd,shd->hts", q.float(), kp) * sm_scale / temperature + log_scale
        s_own = torch.einsum("thd,shd->hts", q.float(), kf) * sm_scale
        s_own = s_own.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        p = torch.softmax(torch.cat([s_lib, s_own], dim=2), dim=-1)
        return torch.einsum("hts,shd->thd", p, torch.cat([vp, vf])).to(q.dtype)

    ids = torch.tensor(prompt)
    pos = torch.arange(lib.position_offset, lib.position_offset + len(prompt))
    with torch.inference_mode():
        return model.compute_logits(model.forward(ids, pos, attn)[-1:])[0]


@pytest.mark.parametrize("temperature, log_scale", [(1.0, 0.0), (0.8, -0.5)])
def test_independent_library_past_context_serves(engine, temperature, log_scale):
    """Builds through the engine's manager (more tokens than the context), serves a request
    whose first token's logits equal the plain-PyTorch reference with the APE tempering."""
    from moska.engine.sampling_params import SamplingParams

    name = f"long-{temperature}-{abs(log_scale)}".replace(".", "")
    opts = IndependentOptions(chunk_sink=True, temperature=temperature, log_scale=log_scale)
    info = engine.libraries.build(
        name, [("a.py", LONG_TEXT)], chunk_size=32, mode="independent", independent=opts
    )
    assert info.num_tokens > 4 * CONTEXT and info.chunk_sink and info.position_offset == 33
    lib = engine.libraries.get(name)
    prompt = "x = f(2)"
    bos = engine.tokenizer.bos_token_id
    ids = engine.tokenizer.encode(prompt)
    assert ids[0] == bos  # a chunk_sink library stores no sink: the request brings it
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1)
    engine.add_request(name, prompt, params, library=name, top_k_chunks=lib.num_chunks)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1].outputs[0]
    want = reference_logits(
        engine.loaded.model, lib, ids, temperature, log_scale, engine.model_config.sm_scale
    )
    lp = torch.log_softmax(want.float(), -1)
    assert final.token_ids[0] == int(want.argmax())
    assert abs(final.logprobs[0].logprob - float(lp.max())) < 1e-3


def test_prefix_build_refused_by_cli(small_ctx_dir, tmp_path, capsys):
    from moska.cli import main

    doc = tmp_path / "long.txt"
    doc.write_text(LONG_TEXT)
    argv = ["library", "build", str(doc), "--name", "long", "--model", str(small_ctx_dir)]
    argv += ["--mode", "prefix", "--chunk-size", "32", "--library-root", str(tmp_path / "libs")]
    argv += ["--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode independent" in err[0], err


def test_prefix_build_refused_over_http(engine):
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    app = create_app(engine, ServerSettings())
    body = {"name": "long", "mode": "prefix", "chunk_size": 32}
    with background_server(app) as url:
        long = httpx.post(
            f"{url}/v1/libraries", json={**body, "documents": [{"name": "a", "text": LONG_TEXT}]}
        )
        short = httpx.post(
            f"{url}/v1/libraries",
            json={**body, "name": "short", "documents": [{"name": "a", "text": "x = 1"}]},
        )
    assert long.status_code == 400, long.text
    err = long.json()["error"]
    assert err["param"] == "mode" and "--mode independent" in err["message"]
    assert short.status_code == 202, short.text  # a prefix library that fits is queued


def test_cli_flags_give_the_options():
    from moska.cli import build_parser
    from moska.library.errors import LibraryError
    from moska.library.positions import DEFAULT_INDEPENDENT, independent_from_args

    def parse(*flags):
        return build_parser().parse_args(["library", "build", "x.txt", "--name", "n", *flags])

    assert independent_from_args(parse("--mode", "independent")) is None  # the defaults
    opts = independent_from_args(
        parse("--mode", "independent", "--no-chunk-sink", "--attention-temperature", "0.8")
    )
    assert opts == IndependentOptions(False, 0.8, DEFAULT_INDEPENDENT.log_scale)
    with pytest.raises(LibraryError, match="--mode independent"):
        independent_from_args(parse("--attention-log-scale", "-0.5"))  # prefix mode
