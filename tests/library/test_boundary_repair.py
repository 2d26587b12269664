"""Boundary repair of position-independent libraries (issue 20 item 2,
``library/boundary_repair.py``): off is the plain build bit for bit; a repaired row is the
joint encoding of the chunk with the chunk before it (plain transformers, its key rotated
back to the position the library stores); the setting reaches the manifest; bad values
are typed errors naming the field."""

from __future__ import annotations

import pytest
import torch

from moska.library import build_in_memory
from moska.library.boundary_repair import (
    BoundaryRepair,
    BoundaryRepairError,
    check_repair,
    repair_from_args,
    repair_targets,
)
from moska.library.format import read_manifest
from moska.library.manager import LibraryManager
from moska.library.positions import IndependentOptions

CHUNK = 24


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, list[int]]]:
    """Random token documents (byte ids): 3 + 2 + 1 chunks of 24."""
    g = torch.Generator().manual_seed(7)
    return [
        (name, torch.randint(0, 256, (n,), generator=g).tolist())
        for name, n in (("a", 70), ("b", 40), ("c", 17))
    ]


def _build(model, docs, repair=None):
    """Pieces of 19 tokens: the forwards cut sequences and pack several (same in every
    build here, so that rows a repair leaves alone are bit-equal)."""
    lib, _ = build_in_memory(
        model, docs, "r", chunk_size=CHUNK, mode="independent", progress=False,
        independent=IndependentOptions(chunk_sink=True), boundary_repair=repair,
        prefill_tokens=19,
    )  # fmt: skip
    return lib


@pytest.fixture(scope="module")
def plain(tiny_model, docs):
    return _build(tiny_model, docs)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _rotate(k: torch.Tensor, delta: int, theta: float) -> torch.Tensor:
    """Keys [T, H, D] rotated by ``delta`` positions (rotate-half RoPE, fp64 angles)."""
    d = k.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([delta * inv, delta * inv])
    cos, sin = ang.cos().float(), ang.sin().float()
    half = torch.cat([-k[..., d // 2 :], k[..., : d // 2]], dim=-1)
    return k * cos + half * sin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("repair", [(0, 2), (8, 0), None])
def test_no_repair_is_the_plain_build(tiny_model, docs, plain, repair):
    lib = _build(tiny_model, docs, repair)
    assert (lib.manifest.repair_tokens, lib.manifest.repair_layers) == (0, 0)
    for a, b in zip(lib.k_pools + lib.v_pools, plain.k_pools + plain.v_pools):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layers", [1, 2])
def test_repaired_rows_are_the_joint_encoding(tiny_model, hf_model, docs, plain, layers):
    """Each continuing chunk's first M rows in the first L layers equal transformers' KV of
    [BOS, preceding chunk, chunk] at those rows, keys rotated back by the context's length
    (the library stores a chunk's keys at positions 1..); every other row is unchanged."""
    m = 5
    lib = _build(tiny_model, docs, (m, layers))
    assert (lib.manifest.repair_tokens, lib.manifest.repair_layers) == (m, layers)
    bos = tiny_model.tokenizer.bos_token_id
    theta = float(tiny_model.config.rope_theta)  # the checkpoint's (10,000: default RoPE)
    ids = lib.token_ids.tolist()
    targets = repair_targets(lib.chunks, m, CHUNK)
    assert [(t.start, t.count) for t in targets] == [(24, 5), (48, 5), (94, 5)]
    changed = torch.zeros(lib.num_tokens, dtype=torch.bool)
    for t in targets:
        ctx = ids[t.context_start : t.start]
        assert len(ctx) == CHUNK  # the whole preceding chunk
        with torch.inference_mode():
            out = hf_model(torch.tensor([[bos, *ctx, *ids[t.start : t.start + m]]]), use_cache=True)
        for layer in range(2):
            want_k = out.past_key_values.layers[layer].keys[0].transpose(0, 1)[-m:]
            want_v = out.past_key_values.layers[layer].values[0].transpose(0, 1)[-m:]
            got_k = lib.k_pools[layer][t.start : t.start + m]
            got_v = lib.v_pools[layer][t.start : t.start + m]
            if layer < layers:
                assert _rel(got_k, _rotate(want_k, -len(ctx), theta)) < 1e-4
                assert _rel(got_v, want_v) < 1e-4
                if layer:  # layer 0's KV is of its token alone: no context changes it
                    assert _rel(got_k, plain.k_pools[layer][t.start : t.start + m]) > 1e-3
            else:  # layers from L on keep the chunk-alone KV
                assert torch.equal(got_k, plain.k_pools[layer][t.start : t.start + m])
        changed[t.start : t.start + m] = True
    for layer in range(2):
        assert torch.equal(lib.k_pools[layer][~changed], plain.k_pools[layer][~changed])
        assert torch.equal(lib.v_pools[layer][~changed], plain.v_pools[layer][~changed])


def test_fp8_library_quantizes_the_repaired_kv(tiny_model, docs, plain):
    """The repair runs before the FP8 quantization (and the routing index): an e4m3 build's
    dequantized rows are the repaired rows (e4m3: ~3 mantissa bits)."""
    lib = _build(tiny_model, docs, (5, 2))
    q, _ = build_in_memory(
        tiny_model, docs, "q", chunk_size=CHUNK, mode="independent", progress=False,
        boundary_repair=(5, 2), prefill_tokens=19, kv_dtype="fp8",
    )  # fmt: skip
    assert q.manifest.repair_tokens == 5
    rows = torch.cat(
        [torch.arange(t.start, t.start + 5) for t in repair_targets(lib.chunks, 5, CHUNK)]
    )
    ks, vs = q.kv_scale_pools[1]  # layer 1: the first whose KV the context changes
    for got, scale, want, alone in (
        (q.k_pools[1], ks, lib.k_pools[1], plain.k_pools[1]),
        (q.v_pools[1], vs, lib.v_pools[1], plain.v_pools[1]),
    ):
        deq = got[rows].float() * scale[rows][..., None]
        assert _rel(deq, want[rows]) < 8e-2 < _rel(deq, alone[rows])


def test_manifest_info_and_build_id(tiny_model, docs, tmp_path):
    mgr = LibraryManager(tmp_path, tiny_model, "cpu", progress=False)
    info = mgr.build("rep", docs, CHUNK, "independent", boundary_repair=BoundaryRepair(4, 1))
    plain = mgr.build("plain", docs, CHUNK, "independent")
    assert (info.repair_tokens, info.repair_layers) == (4, 1)
    assert (plain.repair_tokens, plain.repair_layers) == (0, 0)
    listed = {i.name: (i.repair_tokens, i.repair_layers) for i in mgr.list()}
    assert listed == {"rep": (4, 1), "plain": (0, 0)}
    a, b = read_manifest(tmp_path / "rep"), read_manifest(tmp_path / "plain")
    assert (a.repair_tokens, a.repair_layers) == (4, 1)
    assert a.build_id != b.build_id
    loaded = mgr.get("rep")
    assert loaded.build_id == a.build_id and loaded.manifest.repair_tokens == 4


@pytest.mark.parametrize(
    ("value", "mode", "field"),
    [
        ((-1, 1), "independent", "repair_tokens"),
        ((4, 3), "independent", "repair_layers"),  # the tiny model has 2 KV layers
        ((4, True), "independent", "repair_layers"),
        ((4, 1), "prefix", "repair_tokens"),
        ("4/1", "independent", "boundary_repair"),
    ],
)
def test_bad_settings_name_the_field(tiny_model, docs, value, mode, field):
    with pytest.raises(BoundaryRepairError) as e:
        check_repair(value, mode, 2)
    assert e.value.field == field
    with pytest.raises(BoundaryRepairError):  # the build refuses it before any prefill
        build_in_memory(
            tiny_model, docs, "bad", chunk_size=CHUNK, mode=mode, progress=False,
            boundary_repair=value,
        )  # fmt: skip


def test_cli_flags(tiny_model):
    from moska.cli import build_parser

    parser = build_parser()
    base = ["library", "build", "x.txt", "--name", "n", "--mode", "independent"]
    args = parser.parse_args([*base, "--repair-tokens", "8", "--repair-layers", "2"])
    assert repair_from_args(args) == BoundaryRepair(8, 2)
    assert repair_from_args(parser.parse_args(base)) is None
    with pytest.raises(BoundaryRepairError) as e:
        repair_from_args(parser.parse_args([*base, "--repair-tokens", "8"]))
    assert e.value.field == "repair_layers"
