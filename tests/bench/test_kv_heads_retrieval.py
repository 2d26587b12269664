"""bench/kv_heads_retrieval.py's answer loss scores exactly the answer tokens (against the
plain reference decoder's logits, sliced by hand), and its calibration is the task's own
sequences."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moska.bench import retrieval_tasks as rt
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.model.reference import reference_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from kv_heads_retrieval import answer_loss, calibration

SPEC = rt.RetrievalSpec(vocab_size=256, filler_tokens=96, key_tokens=72, value_tokens=72,
                        context_tokens=96, facts=3, formats=("fact", "code"))  # fmt: skip


def test_answer_loss_scores_the_answer_tokens():
    path = default_model_dir()  # the built-in tiny random model (GQA: any model will do)
    lm = load_model(path, dtype="float32")
    tensors = load_file(str(path / "model.safetensors"))
    examples = rt.make_examples(SPEC, 3, seed=5)
    got = answer_loss(lm, examples, torch.device("cpu"))
    total, count, hits, first = 0.0, 0, 0, None
    for ex in examples:
        ids = ex.context + ex.question + ex.answer
        logits = reference_logits(lm.config, tensors, ids).float()
        first = logits if first is None else first
        a0 = len(ids) - len(ex.answer)
        rows = logits[a0 - 1 : len(ids) - 1]
        total += float(F.cross_entropy(rows, torch.tensor(ex.answer), reduction="sum"))
        count += len(ex.answer)
        hits += rows.argmax(-1).tolist() == ex.answer
    assert abs(got["loss"] - total / count) < 1e-4 * total / count
    assert got["exact"] == hits / len(examples)
    torch.testing.assert_close(got["first"], first, atol=1e-4, rtol=1e-4)  # whole sequence


def test_calibration_is_the_tasks_sequences():
    seqs = calibration(SPEC, 3)
    again = calibration(SPEC, 3)
    assert seqs == again and len(seqs) == 3  # one fixed seed
    assert seqs != calibration(SPEC, 3, seed=1)
    for s in seqs:
        assert s[0] == rt.BOS and len(s) > SPEC.context_tokens  # context, then questions
        assert rt.QUESTION in s[SPEC.context_tokens :] and s[-1] != rt.BOS  # no padding kept
