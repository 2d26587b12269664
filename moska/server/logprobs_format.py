"""OpenAI's logprobs objects of a response: completions' (tokens, token_logprobs,
top_logprobs, text_offset) and chat's (content: token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

from typing import Any

from moska.server.state import ServerState


def token_text(state: ServerState, token_id: int) -> str:
    tok = state.engine.tokenizer
    if tok is None:  # a model without a tokenizer: the id stands for its text
        return f"<{token_id}>"
    try:
        return tok.decode([token_id])
    except Exception:  # noqa: BLE001
        return f"<{token_id}>"


def completion_logprobs(state: ServerState, entries: list[Any], offset: int) -> dict:
    """OpenAI's completions logprobs of `entries` (token_id, logprob, top), text offsets
    from `offset`. An entry whose logprob is None (a prompt's first token) has null ones."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        text = token_text(state, e.token_id)
        tokens.append(text)
        if e.logprob is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(float(e.logprob))
            tops.append({token_text(state, t): float(lp) for t, lp in e.top.items()} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(state: ServerState, entries: list[Any], top_n: int) -> dict:
    content = []
    for e in entries:
        text = token_text(state, e.token_id)
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(
            {
                "token": text,
                "logprob": float(e.logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (s := token_text(state, t)),
                        "logprob": float(lp),
                        "bytes": list(s.encode("utf-8")),
                    }
                    for t, lp in top
                ],
            }
        )
    return {"content": content}
