"""moska.bench.train_code_lm: its corpus leaves out the held-out packages and large files,
each file starts with BOS, and a tiny run writes an MHA checkpoint that moska and transformers
load with equal logits; bench/kv_heads_code.py's window loss is the reference decoder's."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moska.bench.heldout import MAX_FILE_BYTES
from moska.bench.train_code_lm import TokenStream, corpus_files, main
from moska.model import load_model
from moska.model.reference import reference_logits

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from kv_heads_code import summarize, window_loss


@pytest.fixture(scope="module")
def TOK(tmp_path_factory) -> Path:
    """A byte-level tokenizer made here in the quality model's form (its files are not in a
    clean clone): <|endoftext|> is id 0 and the post-processor puts it before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from moska.model.default import _byte_to_char

    out = tmp_path_factory.mktemp("tok")
    vocab = {"<|endoftext|>": 0} | {ch: b + 1 for b, ch in enumerate(_byte_to_char())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
           "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "config.json").write_text(json.dumps({"vocab_size": tok.get_vocab_size()}))
    return out


def _tree(tmp: Path) -> Path:
    src = tmp / "lib"
    for rel in ("pkg/a.py", "pkg/sub/b.py", "networkx/c.py", "sympy/core/d.py",
                "sklearn/e.py", "site-packages/networkx/f.py", "top.py"):  # fmt: skip
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"def f_{p.stem}(x):\n    return x + 1  # {rel}\n" * 20)
    (src / "pkg/big.py").write_text("x = 1\n" * (MAX_FILE_BYTES // 6 + 10))
    return src


def test_corpus_leaves_out_heldout_packages_and_big_files(tmp_path):
    got = {p.relative_to(tmp_path / "lib").as_posix() for p in corpus_files([_tree(tmp_path)])}
    assert got == {"pkg/a.py", "pkg/sub/b.py", "top.py"}


def test_stream_puts_bos_before_each_file(tmp_path, TOK):
    files = corpus_files([_tree(tmp_path)])
    reader = TokenStream(TOK, files, max_mb=1.0, seed=0, chunk_mb=0.001)
    reader.start()
    chunks = []
    while (c := reader.chunks.get(timeout=60)) is not None:
        chunks.append(c)
    assert reader.error is None and len(chunks) >= 2  # chunks of ~1,000 characters
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    ids = torch.cat(chunks).tolist()
    starts = [i for i, t in enumerate(ids) if t == 0]
    assert starts[0] == 0 and len(starts) == len(files)
    pieces = [ids[a + 1 : b] for a, b in zip(starts, starts[1:] + [len(ids)])]
    assert sorted(tok.decode(p) for p in pieces) == sorted(p.read_text() for p in files)


def test_tiny_run_writes_an_mha_checkpoint_moska_and_transformers_agree_on(tmp_path, TOK):
    out = tmp_path / "m"
    main(["--out", str(out), "--tokenizer", str(TOK), "--roots", str(_tree(tmp_path)),
          "--device", "cpu", "--steps", "2", "--context", "32", "--layers", "1", "--hidden", "64",
          "--head-dim", "16", "--batch", "4", "--chunk-mb", "0.1", "--save-dtype", "float32"])  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
    log = json.loads((out / "train_log.json").read_text())
    assert log["summary"]["tokens"] == 2 * 4 * 32 and len(log["log"]) >= 1
    assert (out / "tokenizer.json").is_file()
    lm = load_model(out, dtype="float32")
    ids = lm.tokenizer.encode("def f(x):\n    return x\n")
    assert ids[0] == 0
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float()
    ref = hf(torch.tensor([ids])).logits[0]
    loss, n, logits = window_loss(lm.model, ids, torch.device("cpu"))
    assert float((logits - ref).norm() / ref.norm()) < 1e-4
    # the window loss is the reference decoder's next-token loss
    tensors = load_file(str(out / "model.safetensors"))
    want = reference_logits(lm.config, tensors, ids).float()
    exp = float(F.cross_entropy(want[:-1], torch.tensor(ids[1:]), reduction="sum"))
    assert n == len(ids) - 1 and abs(loss - exp) < 1e-4 * exp


def test_summary_needs_the_clear_margin():
    def rows(fit: float, mean: float) -> list[dict]:
        base = {"variant": "original", "kv_heads": 4, "loss": 2.0, "delta_vs_original": 0.0}
        mk = lambda v, d: {"variant": v, "kv_heads": 2, "removed": 0.5,
                           "loss": 2.0 + d, "delta_vs_original": d}  # fmt: skip
        return [base, mk("fit", fit), mk("mean", mean)]

    assert summarize(rows(0.1, 0.3), 4, [2])["target_met"]
    s = summarize(rows(0.2, 0.3), 4, [2])
    assert s["4->2"]["fit_closer_than_mean"] and not s["target_met"]
    assert not summarize(rows(0.4, 0.3), 4, [2])["target_met"]
