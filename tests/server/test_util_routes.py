"""vLLM's utility routes (/tokenize, /detokenize, /version, /v1/models/{id}) on a real
server with the tiny model, and the OpenAPI schema against the limits the server enforces."""

from __future__ import annotations

import httpx
import openai
import pytest

import moska
from moska.server.protocol import LIBRARY_NAME_PATTERN

pytestmark = pytest.mark.server

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is MoSKA?"},
]


@pytest.fixture(scope="module")
def http(real_server):
    url, _ = real_server
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_version_is_the_package_version(http):
    r = http.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": moska.__version__}


def test_retrieve_model_by_id_and_404_for_another(client, model):
    card = client.models.retrieve(model)
    assert card.id == model
    assert card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct")
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


def test_tokenize_prompt_matches_the_engine_tokenizer(http, real_engine, model):
    prompt = "Hello, shared KV world"
    r = http.post("/tokenize", json={"model": model, "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    want = real_engine.tokenizer.encode(prompt)
    assert body["tokens"] == want
    assert body["count"] == len(want)
    assert body["max_model_len"] == real_engine.max_model_len
    bare = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert bare["tokens"] == real_engine.tokenizer.encode(prompt, add_special_tokens=False)


def test_tokenize_messages_counts_what_a_chat_completion_sends(http, client, real_engine, model):
    r = http.post("/tokenize", json={"model": model, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    bos = real_engine.tokenizer.bos_token_id
    assert tokens.count(bos) == 1 and tokens[0] == bos  # the template's BOS, not a second
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    assert chat.usage.prompt_tokens == r.json()["count"] == len(tokens)
    no_gen = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
    assert no_gen.json()["count"] < len(tokens)  # the assistant header is left out


def test_detokenize_round_trips_and_checks_ids(http, real_engine, model):
    text = "round trip: ünïcode ✓"
    ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    r = http.post("/detokenize", json={"model": model, "tokens": ids["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}
    vocab = real_engine.tokenizer.vocab_size
    bad = http.post("/detokenize", json={"model": model, "tokens": [1, vocab]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens"
    negative = http.post("/detokenize", json={"tokens": [-1]})
    assert negative.status_code == 400


@pytest.mark.parametrize(
    "path, body",
    [
        ("/tokenize", {"model": "other", "prompt": "hi"}),
        ("/tokenize", {"model": "other", "messages": MESSAGES}),
        ("/detokenize", {"model": "other", "tokens": [1]}),
    ],
)
def test_another_model_is_404(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({}, None),
    ],
)
def test_bad_tokenize_bodies_are_400(http, body, param):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 400, r.text
    if param is not None:
        assert param in (r.json()["error"]["param"] or "")


# ---------------------------------------------------------------- the OpenAPI schema


@pytest.fixture(scope="module")
def schema(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _props(schema: dict, name: str) -> dict:
    return schema["components"]["schemas"][name]["properties"]


def test_schema_lists_the_utility_routes(schema):
    paths = schema["paths"]
    assert {"/tokenize", "/detokenize", "/version"} <= paths.keys()
    assert any(p.startswith("/v1/models/{") for p in paths)
    assert schema["info"]["version"] == moska.__version__


def test_schema_n_maximum_is_the_servers(schema, real_server, client, model):
    _, app = real_server
    max_n = app.state.moska.settings.max_n
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        assert _props(schema, name)["n"]["maximum"] == max_n
    best_of = _props(schema, "CompletionRequest")["best_of"]["anyOf"]
    assert next(o for o in best_of if o.get("type") == "integer")["maximum"] == max_n
    ok = client.completions.create(model=model, prompt="a", n=max_n, max_tokens=1)
    assert len(ok.choices) == max_n
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="a", n=max_n + 1, max_tokens=1)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="a", best_of=max_n + 1, max_tokens=1)
    assert e.value.body["param"] == "best_of"


def test_schema_library_names_carry_the_servers_pattern(schema, http, model):
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        options = _props(schema, name)["library"]["anyOf"]
        assert {"type": "string", "pattern": LIBRARY_NAME_PATTERN}.items() <= next(
            o for o in options if o.get("type") == "string"
        ).items()
    params = schema["paths"]["/v1/libraries/{name}"]["get"]["parameters"]
    assert params[0]["schema"]["pattern"] == LIBRARY_NAME_PATTERN
    # what the pattern rejects, the server rejects with a 400; what it admits gets further
    bad = http.post("/v1/completions", json={"model": model, "prompt": "a", "library": "../x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "library"
    missing = http.post(
        "/v1/completions", json={"model": model, "prompt": "a", "library": "no-such-lib"}
    )
    assert missing.status_code == 404


def test_schema_echo_matches_what_the_server_accepts(schema, http, model):
    echo = _props(schema, "CompletionRequest")["echo"]
    admits_true = echo.get("type") == "boolean" and echo.get("enum", [True]) != [False]
    r = http.post(
        "/v1/completions",
        json={"model": model, "prompt": "a", "echo": True, "max_tokens": 1},
    )
    if admits_true:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith("a")
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
