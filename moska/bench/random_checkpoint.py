"""Write a random-weight Llama checkpoint (config.json + model.safetensors, HF names) at
Llama-3.1-8B's layer dims, for benchmarks that start `moska serve` processes (the trace
replay's clusters): a model heavy enough per token that prefill steps slow the decode
steps they share (what disaggregation is about), which the 20M quality model on an H200
is not (its steps are host overhead). `--layers` and `--vocab` trim it so that writing and
loading it fit a device session (16 layers, 32000 tokens: ~7.5 GB). Clients send token
ids; the checkpoint still gets a tokenizer (`write_tokenizer`: token i is the word `t<i>`)
so that a stream carries one event per output token: without one the server has no text
to stream and sends a request's whole output in its final event, and the trace bench then
took the last token's time for the first token's and saw no time per output token at all
(session 15: TPOT p99 0.0 in every row; the P/D front end learnt a first token of ~0.13 s,
the whole decode, and rejected 78-85% of requests against a 0.3 s TTFT SLO).

    python -m moska.bench.random_checkpoint /tmp/rand8b --layers 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def write_checkpoint(
    path: str | Path, *, layers: int = 16, vocab: int = 32000, device: str = "cpu", seed: int = 0
) -> Path:
    """The checkpoint directory (bf16), made on `device` and written from the host."""
    from safetensors.torch import save_file

    from moska.bench.common import LLAMA_3_1_8B, random_loaded_model
    from moska.model.loader import _expected_tensors

    hf = dict(LLAMA_3_1_8B, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1,
              eos_token_id=2, torch_dtype="bfloat16")  # fmt: skip
    loaded = random_loaded_model(hf, torch.bfloat16, device, seed)
    tensors = {
        k: v.contiguous().cpu() for k, v in _expected_tensors(loaded.model, loaded.config).items()
    }
    del loaded
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    write_tokenizer(out, vocab)
    return out


def write_tokenizer(path: str | Path, vocab: int) -> Path:
    """A tokenizer.json whose token i decodes to the word `t<i>` (words joined by spaces), so
    that every output token adds text to a stream (see the module's docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    out = write_checkpoint(a.path, layers=a.layers, vocab=a.vocab, device=a.device)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
