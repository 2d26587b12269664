"""Bodies of the `moska generate` and `moska library` commands (kept apart from argument
parsing so `moska --help` stays fast)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def chat_prompt_ids(tokenizer: Any, text: str, library: Any = None) -> list[int]:
    """Token ids of `text` as one user message in the chat template. The template writes
    its own special tokens (BOS), so the rendered text is encoded without adding them; after
    a `library` (its info) that starts with the BOS, the template's is dropped too."""
    from moska.library.positions import drop_template_bos

    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so --chat cannot apply a chat template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    return ids if library is None else drop_template_bos(ids, tokenizer.bos_token_id, library)


def run_generate(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from moska.config import EngineConfig
    from moska.engine.llm_engine import LLMEngine
    from moska.engine.sampling_params import SamplingParams

    EngineConfig(model=args.model, **engine_kwargs).check_device()  # before the model loads
    engine = LLMEngine.from_model(args.model, **engine_kwargs)
    if getattr(args, "chat_template", None):
        engine.tokenizer.set_chat_template(args.chat_template)
    prompt: str | list[int] = args.prompt
    if args.chat:
        library = engine.libraries.info(args.library) if args.library else None
        prompt = chat_prompt_ids(engine.tokenizer, args.prompt, library)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    engine.add_request("cli", prompt, params, library=args.library, top_k_chunks=args.top_k_chunks)
    t0 = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n += len(out.new_token_ids)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def run_library(args: argparse.Namespace) -> int:
    from moska.library.manager import LibraryManager, default_library_root

    root = args.library_root or default_library_root()
    if args.library_command == "ls":
        mgr = LibraryManager(root, None, "cpu")
        infos = mgr.list()
        if not infos:
            print(f"no libraries in {root}")
        for info in infos:
            if info.status != "ok":  # listed so it can be seen and removed (`library rm`)
                print(f"{info.name}\t{info.status}: {info.reason}")
                continue
            line = f"{info.name}\t{info.num_tokens} tokens\t{info.num_chunks} chunks\t{info.mode}"
            if info.repair_tokens:  # boundary repair: tokens / layers
                line += f"\trepair {info.repair_tokens}/{info.repair_layers}"
            print(line)
        return 0
    if args.library_command == "info":
        mgr = LibraryManager(root, None, "cpu")
        info = mgr.info(args.name)
        for key, value in vars(info).items():
            if value is not None or info.status == "ok":  # damaged: only what is known
                print(f"{key}: {value}")
        return 0
    if args.library_command == "rm":
        LibraryManager(root, None, "cpu").delete(args.name)
        print(f"removed {args.name}")
        return 0
    if args.library_command == "build":
        from moska.cli import _engine_kwargs
        from moska.config import EngineConfig
        from moska.engine.llm_engine import LLMEngine
        from moska.library.boundary_repair import repair_from_args
        from moska.library.documents import read_documents
        from moska.library.positions import independent_from_args

        kwargs = {**_engine_kwargs(args), "library_root": str(root)}
        kwargs["num_kv_blocks"] = kwargs.get("num_kv_blocks") or 16  # a build needs few
        EngineConfig(model=args.model, **kwargs).check_device()
        engine = LLMEngine.from_model(args.model, **kwargs)
        docs = read_documents(args.files, jsonl_field=args.jsonl_field)
        info = engine.libraries.build(  # chunk size None: scales with the token count
            args.name, docs, chunk_size=args.chunk_size, mode=args.mode, kv_dtype=args.kv_dtype,
            routing_rank=args.routing_rank, independent=independent_from_args(args),
            boundary_repair=repair_from_args(args),
        )  # fmt: skip
        print(f"built {info.name}: {info.num_tokens} tokens in {info.num_chunks} chunks")
        return 0
    raise ValueError(f"unknown library action {args.library_command!r}")
