"""Universal MoSKA: a request composes several position-independent libraries.

Exactness with top_k = all against plain PyTorch (attention states and a whole forward),
routing over the union of the parts' chunks, mixed library sets in one batch, handles
acquired and released, and the refusals (prefix-mode part, other model, repeats; HTTP 400
naming ``library``)."""

from __future__ import annotations

import dataclasses
import math

import httpx
import pytest
import torch

from moska.attention.composed import composed_group_states, select_union
from moska.attention.metadata import LibraryGroup
from moska.engine.sampling_params import SamplingParams
from moska.kernel_ops import kernel_ops
from moska.library.composition import ComposedLibrary, CompositionError, check_composable
from moska.library.positions import IndependentOptions
from moska.routing import RoutingPolicy

DOC_A = "".join(chr(97 + (i * 7) % 26) for i in range(70))  # fresh, non-repeating text
DOC_B = "".join(chr(65 + (i * 5) % 26) for i in range(40))
DOC_C = "def g(y):\n    return y * 3\n"
TEMPERED = IndependentOptions(chunk_sink=True, temperature=0.8, log_scale=-0.5)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The built-in tiny model with three libraries: two independent ones of different chunk
    sizes (one APE-tempered) and a prefix-mode one."""
    from moska.engine.llm_engine import LLMEngine

    root = tmp_path_factory.mktemp("libs")
    eng = LLMEngine.from_model(
        None, device="cpu", library_root=str(root), max_model_len=512, num_kv_blocks=64
    )
    libs = eng.libraries
    libs.build("ca", [("a.txt", DOC_A), ("c.py", DOC_C)], chunk_size=16, mode="independent")
    libs.build("cb", [("b.txt", DOC_B)], chunk_size=24, mode="independent", independent=TEMPERED)
    libs.build("pre", [("p.txt", DOC_C)], chunk_size=16, mode="prefix")
    return eng


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def adjust(lib) -> tuple[float, float]:
    m = lib.manifest
    return 1.0 / (m.attention_temperature or 1.0), float(m.attention_log_scale or 0.0)


def reference_attention(q, parts, layer, own_k, own_v, sm_scale, causal=False):
    """Plain PyTorch: every row attends to every row of every part (part logits times its
    1/T plus its log S) and to its own keys. q [T, Hq, D]; own_k/v [S, Hkv, D]."""
    T, Hq, _ = q.shape
    G = Hq // own_k.shape[1]
    scores, values = [], []
    for lib in parts:
        scale, bias = adjust(lib)
        kp = lib.k_pools[layer].float().repeat_interleave(G, 1)
        scores.append(torch.einsum("thd,shd->hts", q.float(), kp) * sm_scale * scale + bias)
        values.append(lib.v_pools[layer].float().repeat_interleave(G, 1))
    s_own = torch.einsum("thd,shd->hts", q.float(), own_k.float().repeat_interleave(G, 1))
    s_own = s_own * sm_scale
    if causal:
        s_own = s_own.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(torch.cat([*scores, s_own], dim=2), dim=-1)
    v = torch.cat([*values, own_v.float().repeat_interleave(G, 1)])
    return torch.einsum("hts,shd->thd", p, v)


def states_of(q, k, v, sm_scale):
    """(o, lse) of rows q over keys k (no mask), plain PyTorch."""
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("thd,shd->ths", q.float(), k.float().repeat_interleave(G, 1)) * sm_scale
    o = torch.einsum("ths,shd->thd", torch.softmax(s, -1), v.float().repeat_interleave(G, 1))
    return o, torch.logsumexp(s, -1)


@pytest.mark.parametrize("kind", ["torch", "triton"])
def test_all_chunks_states_equal_reference(engine, kind):
    """top_k >= all chunks: the composed states merged with the rows' own state equal a
    softmax over every row of both libraries (each with its tempering) and the own keys."""
    comp = ComposedLibrary((engine.libraries.get("ca"), engine.libraries.get("cb")))
    ops = kernel_ops(kind)
    g = torch.Generator().manual_seed(1)
    hq, hkv, d = 4, 2, 64
    q = torch.randn(3, hq, d, generator=g)
    own_k, own_v = torch.randn(5, hkv, d, generator=g), torch.randn(5, hkv, d, generator=g)
    sm_scale = d**-0.5
    group = LibraryGroup(comp, torch.arange(3), top_k=comp.num_chunks, all_rows=True)
    layer = 1
    o_sel, lse_sel, sel = composed_group_states(ops, layer, q, group, sm_scale)
    assert sel.req.numel() == 3 * hkv * comp.num_chunks
    o_base, lse_base = states_of(q, own_k, own_v, sm_scale)
    o, _ = ops.merge_selections(o_base, lse_base, o_sel, lse_sel, sel)
    want = reference_attention(q, comp.parts, layer, own_k, own_v, sm_scale)
    assert rel_err(o, want) < 1e-4


def counting(ops):
    """``ops`` whose grouped_shared counts its calls (one call = one grouped launch)."""
    calls: list[int] = []

    def grouped_shared(*args, **kwargs):
        calls.append(1)
        return ops.grouped_shared(*args, **kwargs)

    return dataclasses.replace(ops, grouped_shared=grouped_shared), calls


def test_resident_libraries_one_grouped_launch_per_layer(engine, launches):
    """Resident libraries sit in the engine's one slot space: a composed request's layer is
    ONE grouped Triton launch over chunks of all of them, an APE-tempered part (another
    softmax scale: per-chunk scales in the launch) included, and with top_k = all it equals
    the plain-PyTorch softmax over every library (each with its tempering) and the own keys.
    Routed (fixed k) it is one launch too."""
    libs = engine.libraries
    if not libs.exists("cc"):
        libs.build("cc", [("d.txt", DOC_B[::-1] + DOC_C)], chunk_size=16, mode="independent")
    ca, cc, cb = libs.get("ca"), libs.get("cc"), libs.get("cb")
    assert all(lib.arena_range is not None for lib in (ca, cb, cc))
    assert ca.arena_range.arena is cb.arena_range.arena is cc.arena_range.arena is libs.arena
    assert ca.k_pools[1].data_ptr() == libs.arena.k_pools[1][ca.arena_range.start].data_ptr()
    assert adjust(cb) != adjust(ca) == adjust(cc)  # cb is tempered: another softmax scale
    comp = ComposedLibrary((ca, cb, cc))
    ops = kernel_ops("triton")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 64, generator=g)
    own_k, own_v = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    group = LibraryGroup(comp, torch.arange(2), top_k=comp.num_chunks, all_rows=True)
    launches.clear()
    o_sel, lse_sel, sel = composed_group_states(ops, 1, q, group, 0.125)
    assert launches.count("_grouped_shared_attention_kernel") == 1, launches
    o_base, lse_base = states_of(q, own_k, own_v, 0.125)
    o, _ = kernel_ops("torch").merge_selections(o_base, lse_base, o_sel, lse_sel, sel)
    assert rel_err(o, reference_attention(q, comp.parts, 1, own_k, own_v, 0.125)) < 1e-4

    torch_ops, calls = counting(kernel_ops("torch"))
    for parts in ((ca, cc), (ca, cb, cc)):
        group = LibraryGroup(ComposedLibrary(parts), torch.arange(2), top_k=3, all_rows=True)
        calls.clear()
        _, _, sel = composed_group_states(torch_ops, 2, q, group, 0.125)
        assert len(calls) == 1 and sel.req.numel() == 2 * 2 * 3  # k per (row, KV head)


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_routing_takes_top_k_over_the_union(engine, threshold):
    """With the exact (oracle) scorer each (row, KV head) reads the k chunks of largest
    attention mass across both libraries; chunk ids are global (part base + local). Fixed k
    (one slot space) and adaptive k at threshold 1 (= k; a Selections per part) alike."""
    comp = ComposedLibrary((engine.libraries.get("ca"), engine.libraries.get("cb")))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 4, 64, generator=g) * 3
    sm_scale, layer, k = 64**-0.5, 2, 3
    policy = RoutingPolicy(scorer="oracle", per_kv_head=True, mass_threshold=threshold)
    group = LibraryGroup(comp, torch.arange(4), top_k=k, policy=policy, all_rows=True)
    o_sel, _, sel = composed_group_states(kernel_ops("torch"), layer, q, group, sm_scale)
    got = {(int(r), int(h), int(c)) for r, h, c in zip(sel.req, sel.kv_head, sel.chunk)}
    mass = []  # [4, Hkv, C] exact log mass per chunk, reference
    for lib in comp.parts:
        scale, bias = adjust(lib)
        offs = lib.chunk_offsets.tolist()
        kp = lib.k_pools[layer].float()
        s = torch.einsum("bhgd,shd->bhgs", q.view(4, 2, 2, 64), kp) * sm_scale * scale + bias
        for c in range(lib.num_chunks):
            mass.append(torch.logsumexp(s[..., offs[c] : offs[c + 1]].flatten(2), -1))
    top = torch.stack(mass, -1).topk(k, dim=-1).indices  # [4, Hkv, k]
    want = {(b, h, int(c)) for b in range(4) for h in range(2) for c in top[b, h]}
    assert got == want
    assert {c for _, _, c in got} & set(range(comp.bases[1], comp.num_chunks))  # both parts
    assert {c for _, _, c in got} & set(range(comp.bases[1]))
    assert o_sel.shape[0] == len(got) == 4 * 2 * k


@pytest.mark.parametrize("kind", ["torch", "triton"])
def test_one_slot_space_equals_a_launch_per_part_selection(engine, kind):
    """Routed key-max top-k (per request, not per KV head): the one-slot-space path (global
    tables, one Selections) and the per-part path (adaptive k at threshold 1: a Selections
    per part) pick the same chunks and give the same merged output."""
    comp = ComposedLibrary((engine.libraries.get("ca"), engine.libraries.get("cb")))
    ops = kernel_ops(kind)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 64, generator=g) * 2
    o_base, lse_base = torch.randn(3, 4, 64, generator=g), torch.randn(3, 4, generator=g)
    outs, picked = [], []
    for threshold in (None, 1.0):
        policy = RoutingPolicy(per_kv_head=False, mass_threshold=threshold)
        group = LibraryGroup(comp, torch.arange(3), top_k=4, policy=policy, all_rows=True)
        o_sel, lse_sel, sel = composed_group_states(ops, 1, q, group, 0.125)
        picked.append({(int(r), int(h), int(c)) for r, h, c in zip(*sel[:3])})
        outs.append(ops.merge_selections(o_base, lse_base, o_sel, lse_sel, sel)[0])
    assert picked[0] == picked[1] and len(picked[0]) == 3 * 2 * 4
    assert {c for _, _, c in picked[0]} & set(range(comp.bases[1], comp.num_chunks))
    assert rel_err(outs[0], outs[1]) < 1e-5


def test_select_union_covers_every_chunk_at_full_k(engine):
    comp = ComposedLibrary((engine.libraries.get("cb"), engine.libraries.get("ca")))
    group = LibraryGroup(comp, torch.arange(2), top_k=comp.num_chunks + 5, all_rows=True)
    sels = select_union(torch.randn(2, 4, 64), group, 0, [1.0, 1.0], [0.0, 0.0], False)
    assert [s.req.numel() for s in sels] == [2 * 2 * p.num_chunks for p in comp.parts]


def reference_logits(engine, parts, prompt_ids, offset):
    """Plain-PyTorch forward of the prompt after every chunk of every part."""
    model, sm_scale = engine.loaded.model, engine.model_config.sm_scale

    def attn(layer, q, k, v):
        return reference_attention(q, parts, layer, k, v, sm_scale, causal=True).to(q.dtype)

    ids = torch.tensor(prompt_ids)
    pos = torch.arange(offset, offset + len(prompt_ids))
    with torch.inference_mode():
        return model.compute_logits(model.forward(ids, pos, attn)[-1:])[0]


def run(engine, requests: dict[str, dict]) -> dict:
    """Add every request, step until done; request id -> final output."""
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=5)
    for rid, kw in requests.items():
        engine.add_request(rid, kw.pop("prompt", "x = g(2)"), params, **kw)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_composed_request_equals_reference_and_releases(engine):
    """top_k = all through the engine: the first token's logprobs equal the plain-PyTorch
    forward over both libraries at positions from the larger offset; the handles are held
    while it runs and released at its end."""
    ca, cb = engine.libraries.get("ca"), engine.libraries.get("cb")
    assert cb.position_offset == 25 > ca.position_offset == 17
    top_k = ca.num_chunks + cb.num_chunks
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=5)
    engine.add_request("full", "x = g(2)", params, libraries=["ca", "cb"], top_k_chunks=top_k)
    assert engine.libraries.num_users("ca") == engine.libraries.num_users("cb") == 1
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert engine.libraries.num_users("ca") == engine.libraries.num_users("cb") == 0
    ids = engine.tokenizer.encode("x = g(2)")  # a chunk_sink part: the request brings BOS
    assert ids[0] == engine.tokenizer.bos_token_id
    want = torch.log_softmax(reference_logits(engine, [ca, cb], ids, 25).float(), -1)
    first = outs[-1].outputs[0].logprobs[0]
    assert first.token_id == int(want.argmax())
    got = torch.tensor([first.top[t] for t in sorted(first.top)])
    assert rel_err(got, want[sorted(first.top)]) < 1e-4
    assert outs[-1].library.name == "ca+cb" and outs[-1].library.num_tokens == (
        ca.num_tokens + cb.num_tokens
    )


def test_mixed_library_sets_share_a_batch(engine):
    """[ca, cb], [cb, ca], [ca] and no library in one batch: each answers as it does alone;
    routed chunks are global ids whose spans name their library."""
    kws = {
        "ab": {"libraries": ["ca", "cb"], "top_k_chunks": 2, "report_routing": True},
        "ba": {"library": ["cb", "ca"], "top_k_chunks": 3},
        "a": {"library": "ca", "top_k_chunks": 2},
        "none": {},
    }
    alone = {rid: run(engine, {rid: dict(kw)})[rid] for rid, kw in kws.items()}
    batch = dict(kws)
    together = run(engine, {f"{rid}-2": dict(kw) for rid, kw in batch.items()})
    for rid in kws:
        a, b = alone[rid].outputs[0], together[f"{rid}-2"].outputs[0]
        assert a.token_ids == b.token_ids
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 1e-4
    routed = together["ab-2"].routed_chunks
    comp = together["ab-2"].library
    assert routed and all(0 <= c < comp.num_chunks for c in routed)
    docs = {comp.chunk_span(c).document.split("/")[0] for c in range(comp.num_chunks)}
    assert docs == {"ca", "cb"}
    assert together["ab-2"].routing_coverage is not None
    assert all(engine.libraries.num_users(n) == 0 for n in ("ca", "cb"))


def test_refusals_name_the_library_and_release(engine):
    params = SamplingParams(max_tokens=1)
    with pytest.raises(CompositionError, match="'pre'") as e:
        engine.add_request("bad1", "x", params, libraries=["ca", "pre"])
    assert e.value.library == "pre" and e.value.param == "library"
    with pytest.raises(CompositionError, match="named twice"):
        engine.add_request("bad2", "x", params, library=["ca", "ca"])
    with pytest.raises(ValueError, match="not both"):
        engine.add_request("bad3", "x", params, library="ca", libraries=["cb"])
    assert all(engine.libraries.num_users(n) == 0 for n in ("ca", "cb", "pre"))
    ca, cb = engine.libraries.get("ca"), engine.libraries.get("cb")
    other = dataclasses.replace(cb.manifest.model, weights_hash="another")
    fake = type("Fake", (), {"name": "cb", "mode": "independent"})()
    fake.manifest = type("M", (), {"model": other})()
    with pytest.raises(CompositionError, match="another model") as e:
        check_composable([ca, fake])
    assert e.value.library == "cb"


def test_http_list_of_libraries(engine):
    """`"library": [...]` over HTTP: served (usage counts both libraries' tokens); a
    prefix-mode part or an unknown name is a 400/404 naming the field."""
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    app = create_app(engine, ServerSettings())
    body = {"model": engine.model_name, "prompt": "x = g(2)", "max_tokens": 2}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={**body, "library": ["ca", "cb"]})
        assert r.status_code == 200, r.text
        details = r.json()["usage"]["prompt_tokens_details"]
        n = engine.libraries.get("ca").num_tokens + engine.libraries.get("cb").num_tokens
        assert details["library_tokens"] == n
        r = http.post("/v1/completions", json={**body, "library": ["ca", "pre"]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "library" and "'pre'" in err["message"]
        r = http.post("/v1/completions", json={**body, "library": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "library"
        r = http.post("/v1/completions", json={**body, "library": ["ca", "nope"]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "library"


def test_fp8_and_tiered_parts_compose(engine):
    """An FP8 part reads as a part holding its values (pools times scales); every part in
    tiers (a GPU budget of 2 chunks, misses waited for) answers as wholly resident."""
    from moska.engine.llm_engine import LLMEngine
    from moska.library.fp8 import dequantize

    libs = engine.libraries
    libs.build("c8", [("c.py", DOC_C * 3)], chunk_size=16, mode="independent", kv_dtype="fp8")
    libs.build("c8v", [("c.py", DOC_C * 3)], chunk_size=16, mode="independent")
    fp8, values = libs.get("c8"), libs.get("c8v")
    assert fp8.kv_scales(0) is not None and values.kv_scales(0) is None
    for i in range(fp8.num_kv_layers):
        ks, vs = fp8.kv_scales(i)
        values.k_pools[i] = dequantize((fp8.k_pools[i], ks), fp8.chunk_offsets)
        values.v_pools[i] = dequantize((fp8.v_pools[i], vs), fp8.chunk_offsets)
    got = run(engine, {"q8": {"libraries": ["c8", "cb"], "top_k_chunks": 3}})["q8"]
    want = run(engine, {"qv": {"libraries": ["c8v", "cb"], "top_k_chunks": 3}})["qv"]
    a, b = got.outputs[0], want.outputs[0]
    assert a.token_ids == b.token_ids
    assert max(abs(a.logprobs[0].top[t] - b.logprobs[0].top[t]) for t in b.logprobs[0].top) < 1e-4

    k = libs.get("ca").k_pools[0]
    per_chunk = 2 * 24 * k.shape[1] * k.shape[2] * k.element_size() * libs.get("ca").num_kv_layers
    tiered = LLMEngine.from_model(
        None, device="cpu", library_root=str(libs.root), max_model_len=512, num_kv_blocks=64,
        library_gpu_budget=f"{2 * per_chunk}B", library_cpu_budget="0",
    )  # fmt: skip
    for top_k in (3,):  # routed; more chunks than the 2 GPU slots over the rows
        kw = {"libraries": ["ca", "cb"], "top_k_chunks": top_k}
        want = run(engine, {"r": dict(kw)})["r"].outputs[0]
        got = run(tiered, {"t": dict(kw)})["t"].outputs[0]
        assert tiered.libraries.get("ca").tiers is not None
        assert got.token_ids == want.token_ids
        assert abs(got.logprobs[0].logprob - want.logprobs[0].logprob) < 1e-4
