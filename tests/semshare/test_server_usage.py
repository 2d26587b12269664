"""Over HTTP, `usage.prompt_tokens_details.reused_tokens` reports the prompt tokens whose KV
a stored similar prompt gave (0 for the first, computed in full)."""

import random

import openai
import pytest

from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.settings import ServerSettings


@pytest.fixture(scope="module")
def client(reuse_llm):
    with background_server(create_app(reuse_llm.engine, ServerSettings())) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_usage_reports_reused_tokens(client):
    rng = random.Random(3)
    a = [rng.randrange(0, 256) for _ in range(48)]
    b = a[:20] + [9, 9] + a[20:]
    model = client.models.list().data[0].id
    first = client.completions.create(model=model, prompt=a, max_tokens=2)
    assert first.usage.prompt_tokens_details.model_extra["reused_tokens"] == 0
    near = client.completions.create(model=model, prompt=b, max_tokens=2)
    reused = near.usage.prompt_tokens_details.model_extra["reused_tokens"]
    assert 0 < reused < len(b)
