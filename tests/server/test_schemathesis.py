"""Property-based fuzzing of every operation in the server's OpenAPI spec: no 5xx.

Bounded: a fixed number of examples per operation and generation mode, against a real
engine with a short context so that any accepted generation ends quickly.
"""

from __future__ import annotations

import collections

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase

from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(170)
MAX_EXAMPLES = 4  # per operation and mode: the schema is walked in every CI run


@pytest.fixture(scope="module")
def fuzz_server():
    from moska.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(None, device="cpu", max_model_len=64, num_kv_blocks=512)
    app = create_app(engine, ServerSettings(max_n=4, max_body_bytes=32 * 1024))
    with background_server(app) as url:
        yield url, engine


def _steer(body: dict, model: str) -> None:
    """Point valid generation requests at the served model and keep them short, so the
    bounded run reaches the engine instead of stopping at 'unknown model'."""
    if "model" in body and ("prompt" in body or "messages" in body):
        body["model"] = model
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = min(body[key], 8)


def _fuzz(operation, mode, url: str, served: str, statuses, failures: list[str]) -> int:
    calls = 0

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        nonlocal calls
        calls += 1
        if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
            _steer(case.body, served)
        response = case.call(base_url=url, timeout=30)
        statuses[(case.method, case.path, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}\n{case.as_curl_command()}"
            )

    check()
    return calls


def _nothing_to_make_invalid(operation) -> bool:
    """No body and only unconstrained string parameters: every input is valid, and
    hypothesis would search seconds for an invalid case before giving up (Unsatisfiable)."""
    if len(operation.body):
        return False
    for kind in (operation.path_parameters, operation.query, operation.headers):
        for param in kind:
            schema = (param.definition or {}).get("schema", {})
            if schema.get("type") != "string" or set(schema) - {"type", "title", "description"}:
                return False
    return True


def test_openapi_fuzz_finds_no_server_error(fuzz_server):
    url, engine = fuzz_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    served = engine.model_name
    failures: list[str] = []
    statuses: collections.Counter = collections.Counter()
    seen = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and _nothing_to_make_invalid(operation):
                continue
            try:
                seen += _fuzz(operation, mode, url, served, statuses, failures)
            except hypothesis.errors.Unsatisfiable:
                # nothing to make invalid (an operation without parameters or body)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not failures, "\n\n".join(failures[:5])
    assert seen > 0
    # the fuzzing reached the engine, not only the validators
    assert statuses[("POST", "/v1/completions", 200)] > 0, statuses
    assert statuses[("POST", "/v1/chat/completions", 200)] > 0, statuses
    assert not engine.has_unfinished_requests()
