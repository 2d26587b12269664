"""Bucket choice and padding of the decode CUDA graphs (plain tensors: runs on CPU)."""

import weakref

import torch

from moska.engine.cuda_graphs import DecodeGraphs, LibrarySpec, _Graph


def _graphs(max_batch: int) -> DecodeGraphs:
    return DecodeGraphs(
        None,
        None,
        scratch_block=9,
        block_size=16,
        max_blocks=4,
        max_batch=max_batch,
        device=torch.device("cpu"),
    )


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert _graphs(256).buckets == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    g = _graphs(100)
    assert g.buckets == [1, 2, 4, 8, 16, 32, 64, 100]
    assert [g.bucket(n) for n in (1, 3, 64, 65, 100)] == [1, 4, 64, 100, 100]
    assert g.bucket(101) is None  # larger steps run eagerly


def test_padding_rows_point_at_the_scratch_block_after_a_larger_step():
    g = _graphs(8)
    b = 8
    entry = _Graph(
        graph=None,
        ids=torch.arange(b) + 100,
        pos=torch.arange(b) + 50,
        slots=torch.arange(b) * 3,  # a previous step's live slots in every row
        seq_lens=torch.full((b,), 40, dtype=torch.int32),
        tables=torch.arange(b * 4, dtype=torch.int32).view(b, 4),
        hidden=torch.zeros(b, 2),
        group=None,
    )
    g._pad(entry, 3)
    assert entry.slots[:3].tolist() == [0, 3, 6]  # the live rows are the caller's to fill
    assert entry.slots[3:].tolist() == [9 * 16] * 5  # scratch block, slot 0
    assert entry.seq_lens[3:].tolist() == [1] * 5
    assert bool((entry.tables[3:] == 9).all()) and bool((entry.ids[3:] == 0).all())
    assert bool((entry.pos[3:] == 0).all())


class _Lib:  # a stand-in for a loaded library: weak-referencable
    pass


def _recording(max_batch: int):
    g = _graphs(max_batch)
    order = []

    def fake_capture(b, spec):
        order.append((b, None if spec is None else spec.name))
        lib = None if spec is None else weakref.ref(spec.library)
        return _Graph(None, *(torch.zeros(b) for _ in range(5)), None, None, library=lib)

    g._capture = fake_capture
    return g, order


def test_capture_ahead_takes_largest_bucket_first_and_skips_captured_ones():
    g, order = _recording(8)
    lib = _Lib()
    spec = LibrarySpec("docs", lib, top_k=8, scorer="keymax", record=True)
    assert g.capture([None, spec], progress=False) == 8
    assert order == [(8, None), (4, None), (2, None), (1, None)] + [
        (b, "docs") for b in (8, 4, 2, 1)
    ]
    assert g.capture([None, spec], progress=False) == 0  # all there already
    assert g.captures == 8


def test_capture_ahead_recaptures_a_reloaded_library():
    g, _order = _recording(2)
    old = _Lib()
    g.capture([LibrarySpec("docs", old, 8, "keymax", True)], progress=False)
    new = _Lib()  # same name, a new object: the old graphs read freed tensors
    assert g.capture([LibrarySpec("docs", new, 8, "keymax", True)], progress=False) == 2
    del old
    assert g.capture([LibrarySpec("docs", new, 8, "keymax", True)], progress=False) == 0
