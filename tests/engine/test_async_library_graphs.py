"""Library decode steps replayed from a CUDA graph run ahead of their tokens (asynchronous
scheduling) and still report the chunks each token's step routed to: the report is a
snapshot of the graph's selection tensors, which the next replay overwrites. On CPU, with
the capture faked as a forward that writes its captured tensors in place on each replay,
as a real graph does. Also: the routing report's array form equals the per-selection
loop it replaced, on random selections."""

import random
import weakref

import numpy as np
import torch

from moska import LLM, SamplingParams
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.attention.routing_report import GroupRouting
from moska.engine.cuda_graphs import DecodeGraphs, _Graph
from moska.engine.runner import ModelRunner
from moska.engine.step_output import routing_reports
from moska.kernels.selections import Selections

KW = {"device": "cpu", "dtype": "float32", "attention": "torch", "max_model_len": 512}
DOCS = [(f"d{i}.md", f"Document {i} is about topic {i * 7}.") for i in range(8)]


class _EagerGraph:
    def __init__(self, run) -> None:
        self.replay = run


def _fake_capture(self, b: int, spec):
    """DecodeGraphs._capture without CUDA: the same static inputs and padding; a replay
    runs the forward eagerly and copies its hidden states and routing selections into the
    tensors kept at capture (a real replay overwrites those in place)."""
    i64, i32 = torch.int64, torch.int32
    g = _Graph(None, torch.empty(b, dtype=i64), torch.empty(b, dtype=i64),  # type: ignore[arg-type]
               torch.empty(b, dtype=i64), torch.empty(b, dtype=i32),
               torch.empty((b, self.max_blocks), dtype=i32), None, None)  # fmt: skip
    self._pad(g, 0)
    meta = AttentionMetadata(g.slots, torch.arange(b + 1, dtype=i32), g.seq_lens, g.tables,
                             decode_only=True)  # fmt: skip
    if spec is not None:
        g.group = LibraryGroup(library=spec.library, rows=torch.arange(b), top_k=spec.top_k,
                               scorer=spec.scorer, policy=spec.policy, all_rows=True,
                               record=spec.record)  # fmt: skip
        meta.groups.append(g.group)
        g.library = weakref.ref(spec.library)
    bound = self.attention.bind(meta)
    live = bound.routing[0] if spec is not None else None
    g.hidden = self.model(g.ids, g.pos, bound).clone()  # the warm-up
    if live is not None:
        g.routing = GroupRouting(
            {layer: Selections(*(t.clone() for t in s[:3])) for layer, s in live.selections.items()}
        )

    def run() -> None:
        if live is not None:
            live.clear()
        g.hidden.copy_(self.model(g.ids, g.pos, bound))
        if live is not None:
            for layer, s in live.selections.items():
                for dst, src in zip(g.routing.selections[layer], s[:3]):
                    dst.copy_(src)

    g.graph = _EagerGraph(run)  # type: ignore[assignment]
    g.keep = [meta, bound]
    return g


def _serve(tmp_path, monkeypatch, graphs: bool, asyn: bool):
    if graphs:  # (captured lazily, at a batch's first decode step: patched to the end)
        monkeypatch.setattr(ModelRunner, "_use_graphs", lambda self, kv_parallel: True)
        monkeypatch.setattr(DecodeGraphs, "_capture", _fake_capture)
    llm = LLM(None, num_kv_blocks=128, library_root=str(tmp_path), async_scheduling=asyn,
              max_num_seqs=4, **KW)  # fmt: skip
    eng = llm.engine
    if not eng.libraries.exists("docs"):  # the second engine loads the first's
        eng.libraries.build("docs", DOCS, chunk_size=16, mode="prefix")
    rng = random.Random(3)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    for i in range(3):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 9))]
        eng.add_request(f"r{i}", prompt, params, library="docs", top_k_chunks=2)
    tokens, routed, ahead = {}, {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] = out.outputs[0].token_ids
            routed.setdefault(out.request_id, []).append(out.routed_chunks)
        ahead += eng._in_flight is not None
    eng.block_manager.check_integrity()
    replays = 0 if eng.runner.graphs is None else eng.runner.graphs.captures
    return tokens, routed, ahead, replays


def test_library_steps_from_graphs_run_ahead_with_their_own_routing(tmp_path, monkeypatch):
    ref_tokens, ref_routed, ref_ahead, _ = _serve(tmp_path, monkeypatch, False, False)
    tokens, routed, ahead, captures = _serve(tmp_path, monkeypatch, True, True)
    assert ref_ahead == 0 and captures >= 1  # graphs were captured and replayed
    assert ahead >= 4  # library decode steps were queued before their tokens came back
    assert tokens == ref_tokens and len(tokens) == 3
    assert routed == ref_routed  # each token with its own step's chunks, not the next's
    # the routing changes from step to step, so a report read after the next replay
    # (no snapshot) would differ
    assert any(len({tuple(c) for c in r[1:]}) > 1 for r in ref_routed.values())
    assert all(len(c) == 2 for r in routed.values() for c in r[1:])


def _loop_reports(sel, rows, reqs):
    """The per-selection loop routing_reports used before (the reference)."""
    local = {row: i for i, row in enumerate(rows)}
    by_row: dict[int, list[int]] = {}
    for r, h, c in zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()):
        if h == 0:
            by_row.setdefault(r, []).append(c)
    return {rid: sorted(by_row.get(local[row], [])) for rid, row in reqs}


def test_routing_reports_match_the_loop_on_random_selections():
    gen = np.random.default_rng(7)
    b, heads, chunks, k = 37, 4, 19, 5
    triples = sorted(
        (int(c), h, r)
        for r in range(b)
        for h in range(heads)
        for c in gen.choice(chunks, size=k, replace=False)
    )  # sorted by (chunk, kv_head, req), as Selections are
    c, h, r = (torch.tensor(x, dtype=torch.int32) for x in zip(*triples))
    sel = Selections(r, h, c)
    rows = list(range(3, 3 + b))  # the group's rows within a larger step
    reqs = [(f"q{i}", rows[i]) for i in gen.permutation(b)[:20]]

    class _Req:
        def __init__(self, rid: str) -> None:
            self.request_id, self.report_routing = rid, False

    got = routing_reports(GroupRouting({5: sel}), rows, [(_Req(q), row) for q, row in reqs])
    want = _loop_reports(sel, rows, reqs)
    assert {q: got[q].chunks for q in want} == want
    assert all(len(v) == k for v in want.values())
