"""CLI flags as vLLM users type them: every EngineConfig field has a flag that reaches the
engine config, serve's own flags parse, `generate --chat` adds BOS once, and the model id
is the model directory's name."""

from __future__ import annotations

import dataclasses
import shlex
import typing

import pytest

from moska import LLM
from moska.cli import ENGINE_FLAG_HELP, _engine_kwargs, _serve_model, build_parser, main
from moska.config import EngineConfig

# A value other than the default for each field type, valid for EngineConfig.
_OTHER = {
    "device": "cpu",
    "dtype": "float16",
    "attention": "torch",
    "block_size": 32,
    "library_root": "/tmp/moska-libs",
    "gpu_memory_utilization": 0.5,
    "memory_budget": "2GiB",
    "routing_scorer": "keymax",  # differs from the default None; page_size needs key-max
    "library_gpu_budget": "8GiB",
    "library_cpu_budget": "0",
    "library_eviction": "lru",
    "library_miss_policy": "skip",
    "library_prefetch": "none",
    "fp8_attention": "mma",
    "flexicache": "k=4,threshold=0.25",
}


def _other_value(field: dataclasses.Field, kind: type):
    if field.name in _OTHER:
        return _OTHER[field.name]
    if kind is bool:
        return not field.default if field.default is not None else False
    if kind is int:
        return (field.default or 0) + 3
    if kind is float:
        return (field.default or 0.0) / 2 + 0.1
    raise AssertionError(f"no test value for EngineConfig.{field.name} ({kind})")


def _kind(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["library", "build", "x"]])
def test_every_engine_config_field_has_a_flag_that_reaches_the_config(command):
    """Fails when a field is added to EngineConfig without a flag (or a help entry)."""
    parser = build_parser()
    hints = typing.get_type_hints(EngineConfig)
    fields = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]
    argv = list(command)
    if command[0] == "library":
        argv += ["--name", "n"]
    want = {}
    for f in fields:
        assert f.name in ENGINE_FLAG_HELP, f"EngineConfig.{f.name} has no documented flag"
        kind = _kind(hints[f.name])
        value = _other_value(f, kind)
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if kind is bool else [flag, str(value)]
        want[f.name] = value
    args = parser.parse_args(argv)
    kwargs = _engine_kwargs(args)
    if command[0] == "generate":  # --seed is the request's and the engine's (see main)
        kwargs["seed"] = args.seed
    for name, value in want.items():  # every flag reaches the engine's arguments
        assert kwargs[name] == value, name
    # and they make a valid config (semantic reuse does not run with tensor parallelism)
    config = EngineConfig(**{**kwargs, "tensor_parallel_size": 1})
    for name, value in want.items():
        assert getattr(config, name) == value or name == "tensor_parallel_size", name


def test_defaults_are_the_engine_configs():
    args = build_parser().parse_args(["serve"])
    assert EngineConfig(**_engine_kwargs(args)) == EngineConfig()


def test_vllm_style_serve_command_line():
    argv = shlex.split(
        "serve /models/Llama-3.1-8B-Instruct --served-model-name llama --max-model-len 2048 "
        "--max-num-seqs 8 --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --seed 3 "
        "--chat-template t.jinja --no-enable-prefix-caching --dtype half --max-body-size 1M "
        "--ttft-slo none"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    kwargs = _engine_kwargs(args)
    assert _serve_model(parser, args) == "/models/Llama-3.1-8B-Instruct"
    assert args.served_model_name == "llama" and args.chat_template == "t.jinja"
    assert args.max_body_size == 1 << 20 and args.ttft_slo is None
    assert kwargs["max_model_len"] == 2048 and kwargs["max_num_seqs"] == 8
    assert kwargs["max_num_batched_tokens"] == 512 and kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["seed"] == 3 and kwargs["dtype"] == "float16"
    assert kwargs["enable_prefix_caching"] is False
    flag = parser.parse_args(["serve", "--model", "/m/x"])
    assert _serve_model(parser, flag) == "/m/x"


def test_two_different_models_is_a_usage_error(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "/m/a", "--model", "/m/b"])
    with pytest.raises(SystemExit) as e:
        _serve_model(parser, args)
    assert e.value.code == 2
    assert "two models" in capsys.readouterr().err


@pytest.mark.parametrize("value, want", [("0", None), ("none", None), ("OFF", None), ("2.5", 2.5)])
def test_ttft_slo_zero_or_none_turns_rejection_off(value, want):
    assert build_parser().parse_args(["serve", "--ttft-slo", value]).ttft_slo == want


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_bad_ttft_slo_is_a_usage_error(value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--ttft-slo", value])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def tiny_engine():
    from moska.engine.llm_engine import LLMEngine

    return LLMEngine.from_model(None, device="cpu", num_kv_blocks=64)


def test_cpu_runner_is_eager_and_owns_every_block():
    llm = LLM(None, device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    runner = llm.engine.runner
    assert runner.graphs is None
    assert runner.num_blocks == runner.cache.num_blocks == 64
    assert llm.engine.capture_graphs(progress=False) == 0  # serve's pre-capture: a no-op here
    assert llm.engine.block_manager.enable_prefix_caching is False


def test_model_id_is_the_directory_name_not_its_path():
    from moska.engine.llm_engine import LLMEngine
    from moska.model.default import default_model_dir

    path = default_model_dir()
    engine = LLMEngine.from_model(str(path) + "/", device="cpu", num_kv_blocks=16)
    assert engine.model_name == path.name
    assert engine.block_manager.enable_prefix_caching is True


def _run_generate(monkeypatch, engine, argv: list[str]) -> list[list[int]]:
    """Run `moska generate` on `engine`; return the prompt ids each request was given."""
    from moska.engine.llm_engine import LLMEngine

    prompts: list[list[int]] = []
    real_add = engine.add_request

    def add_request(request_id, prompt, params, **kw):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        prompts.append(ids)
        return real_add(request_id, prompt, params, **kw)

    monkeypatch.setattr(engine, "add_request", add_request)
    monkeypatch.setattr(LLMEngine, "from_model", classmethod(lambda cls, *a, **k: engine))
    assert main(["generate", *argv, "--max-tokens", "2", "--device", "cpu"]) == 0
    return prompts


@pytest.fixture
def llama3_style_tokenizer(tiny_engine, monkeypatch):
    """The tiny tokenizer with a post-processor that adds BOS, as Llama 3's tokenizer.json
    does: encoding text that already starts with BOS with special tokens gives two."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    from moska.model.tokenizer import Tokenizer

    tiny = tiny_engine.tokenizer
    hf = HFTokenizer.from_str(tiny._tok.to_str())
    bos = tiny.bos_token
    hf.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tiny.bos_token_id)]
    )
    tok = Tokenizer(
        hf,
        tiny.special_tokens,
        eos_token_ids=tiny.eos_token_ids,
        chat_template=tiny.chat_template,
    )
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert tok.encode(text).count(tok.bos_token_id) == 2  # the trap generate must avoid
    monkeypatch.setattr(tiny_engine, "tokenizer", tok)
    return tok


def test_generate_chat_adds_bos_once(monkeypatch, tiny_engine, llama3_style_tokenizer):
    bos = llama3_style_tokenizer.bos_token_id
    assert "bos_token" in llama3_style_tokenizer.chat_template  # the template writes BOS
    (chat,) = _run_generate(monkeypatch, tiny_engine, ["Hello", "--chat"])
    assert chat.count(bos) == 1 and chat[0] == bos
    (plain,) = _run_generate(monkeypatch, tiny_engine, ["Hello"])
    assert plain.count(bos) == 1  # a plain prompt still gets its BOS


def test_chat_template_flag_inline_and_from_a_file(monkeypatch, tiny_engine, tmp_path):
    tok = tiny_engine.tokenizer
    original = tok.chat_template
    inline = "{{ bos_token }}Q: {% for m in messages %}{{ m['content'] }}{% endfor %} A:"
    try:
        (ids,) = _run_generate(
            monkeypatch, tiny_engine, ["hi", "--chat", "--chat-template", inline]
        )
        assert tok.decode(ids, skip_special_tokens=True) == "Q: hi A:"
        file = tmp_path / "t.jinja"
        file.write_text("{{ bos_token }}<<{{ messages[0]['content'] }}>>")
        (ids,) = _run_generate(
            monkeypatch, tiny_engine, ["yo", "--chat", "--chat-template", str(file)]
        )
        assert tok.decode(ids, skip_special_tokens=True) == "<<yo>>"
        assert ids.count(tok.bos_token_id) == 1
    finally:
        tok.set_chat_template(original)


def test_bad_chat_templates_are_value_errors(tiny_engine):
    from moska.model.tokenizer import ChatTemplateError

    tok = tiny_engine.tokenizer
    with pytest.raises(ChatTemplateError, match="neither a file nor Jinja"):
        tok.set_chat_template("no/such/template.jinja")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.set_chat_template("{% for m in messages %}")
    assert "bos_token" in tok.chat_template  # a failed override leaves the old template
