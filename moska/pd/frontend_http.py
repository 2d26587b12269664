"""What the P/D front end reads from a client's body and writes back to it: the prompt the
prefix index hashes (without a tokenizer), OpenAI-shaped error bodies, and the header that
carries the scheduler's prediction. The front end itself is `pd/frontend.py`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from moska.pd.scheduler import Plan

TRANSFER_HEADER = "x-moska-pd-transfer"
PREDICTED_HEADER = "x-moska-pd-predicted"
DEFAULT_MAX_TOKENS = 256  # the prediction's guess when a request names no max_tokens


def error_response(
    status: int, message: str, param: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    if status == 429:
        body["error"]["type"] = "rate_limit_error"
    elif status >= 500:
        body["error"]["type"] = "server_error"
    return JSONResponse(body, status, headers=headers)


def prompt_tokens(kind: str, body: dict) -> list[int]:
    """What the index hashes: token ids when the client sent ids, else the UTF-8 bytes of the
    text (the front end has no tokenizer; equal text still gives equal blocks)."""
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        if isinstance(prompt, str):
            return list(prompt.encode())
        raise ValueError("prompt")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages")
    text = "".join(f"{m.get('role')}:{m.get('content')}\n" for m in messages if isinstance(m, dict))
    return list(text.encode())


def predicted_headers(plan: Plan | None) -> dict[str, str]:
    """What the scheduler predicted for an admitted request (`x-moska-pd-predicted`: TTFT s,
    TPOT s, the decode batch it joined), for benchmarks to compare with what they saw."""
    if plan is None:
        return {}
    p = plan
    return {PREDICTED_HEADER: f"{p.predicted_ttft_s:.4f},{p.predicted_tpot_s:.4f},{p.batch}"}
