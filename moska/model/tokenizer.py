"""Tokenizer: HF `tokenizer.json` via the `tokenizers` library, plus chat templates and streaming."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from moska.model.errors import CorruptCheckpointError, MissingFileError

_REPLACEMENT = "\ufffd"


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering like `transformers`."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        add_bos_token: bool = False,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        eos = set(eos_token_ids)
        if (eos_id := self.token_to_id(self.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: set[int] = eos
        self._compiled_template: Any = None  # a jinja2 Template, compiled on first use

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, extra_eos_token_ids: Iterable[int] = ()
    ) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise MissingFileError(f"{tok_file}: tokenizer.json not found")
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise CorruptCheckpointError(f"{tok_file}: unreadable tokenizer ({e})") from e
        cfg = _read_json(path / "tokenizer_config.json")
        special = {
            key: _token_str(cfg.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        eos_ids = set(extra_eos_token_ids)
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        if gen_eos is not None:
            eos_ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        return cls(
            hf,
            special,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            eos_token_ids=eos_ids,
            chat_template=template if isinstance(template, str) else None,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: a 10 MB text
        # then stalls every other thread, the server's event loop included, for seconds)
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.bos_token_id
        wants_bos = add_special_tokens and self.add_bos_token and bos is not None
        if wants_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja chat template (sandboxed, as HF does).

        Extra keyword arguments (tools, enable_thinking, ...) are passed to the template.
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no 'chat_template' in "
                "tokenizer_config.json and no chat_template.jinja); send a plain prompt instead"
            )
        template = self._compiled_template
        if template is None:
            template = self._compiled_template = _compile_template(self.chat_template)
        return template.render(
            **{**self.special_tokens, **kwargs},
            messages=messages,
            add_generation_prompt=add_generation_prompt,
        )

    def set_chat_template(self, template: str) -> None:
        """Replace the model's chat template (`--chat-template`): `template` is a path to a
        Jinja file or the Jinja source itself. Compiled now, so a broken template fails at
        startup rather than on the first chat request. Raises ChatTemplateError."""
        source = load_chat_template(template)
        from jinja2 import TemplateError

        try:
            compiled = _compile_template(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from e
        self.chat_template, self._compiled_template = source, compiled


class ChatTemplateError(ValueError):
    """A chat template given by the user cannot be read or compiled."""


def load_chat_template(value: str) -> str:
    """A chat template from a file path or inline Jinja (vLLM's `--chat-template` takes
    both): text with Jinja delimiters is the template, anything else must be a file."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ChatTemplateError(
            f"chat template {value!r} is neither a file nor Jinja text (no '{{{{' or '{{%')"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"cannot read the chat template file {value!r}: {e}") from e


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas, safe across multi-byte characters.

    Decodes a small window (prefix_offset..end) and emits only the part past what was already
    emitted, and only when it does not end in the replacement char U+FFFD (an incomplete UTF-8
    sequence). Prompt ids may be given so that the first generated token decodes with its
    correct leading space.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        # Start the window a few tokens back so the first delta is decoded in context.
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""  # everything emitted so far

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append one or more token ids; return newly completed text ('' if none yet)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Flush text held back at the end (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset)
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
