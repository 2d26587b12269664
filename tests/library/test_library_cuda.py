"""The CUDA build path (Triton paged prefill kernel) against the dense reference."""

import pytest
import torch

from moska.library import build_in_memory
from moska.model import DenseAttention, load_model

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("mode", ["prefix", "independent"])
def test_cuda_build_matches_dense_bf16(tiny_dir, mode):
    from moska.kernel_ops import kernel_ops
    from moska.library.positions import IndependentOptions

    lm = load_model(tiny_dir, dtype="bfloat16", device="cuda")
    lm.model.kernels = kernel_ops("triton")  # what an engine on CUDA hands the model

    lib, _ = build_in_memory(
        lm,
        DOCS * 4,
        "g",
        chunk_size=64,
        mode=mode,
        prefill_tokens=100,
        progress=False,
        independent=IndependentOptions(chunk_sink=False),  # each chunk alone, from position 0
    )
    assert lib.device.type == "cuda" and lib.k_pools[0].dtype == torch.bfloat16
    for c in lib.chunks if mode == "independent" else [None]:
        lo, hi = (0, lib.num_tokens) if c is None else (c.start, c.end)
        attn = DenseAttention()
        ids = lib.token_ids[lo:hi].to("cuda", torch.int64)
        with torch.inference_mode():
            lm.model.forward(ids, torch.arange(hi - lo, device="cuda"), attn)
        for layer in range(lib.num_layers):
            for got, want in (
                (lib.k_pools[layer][lo:hi], attn.k[layer]),
                (lib.v_pools[layer][lo:hi], attn.v[layer]),
            ):
                err = (got.float() - want.float()).norm() / want.float().norm()
                assert err < 2e-2, (layer, err.item())


def test_cuda_manager_round_trip(tiny_dir, tmp_path):
    from moska.library import LibraryManager

    lm = load_model(tiny_dir, dtype="bfloat16", device="cuda")
    mgr = LibraryManager(tmp_path, lm, "cuda", progress=False)
    mgr.build("g", DOCS, chunk_size=32)
    built = mgr.get("g")
    assert built.device.type == "cuda" and mgr.loaded_names() == ["g"]
    mgr.unload("g")
    loaded = mgr.get("g")
    assert loaded is not built and loaded.device.type == "cuda"
    for a, b in zip(built.k_pools, loaded.k_pools, strict=True):
        assert torch.equal(a, b)
    assert all(t.is_cuda for t in loaded.routing[0])
