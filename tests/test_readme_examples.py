"""Every curl and Python example in README.md runs against a real `moska serve` (the
installed script, the built-in tiny model, the demo library) and returns sane output; the
same server's startup log says what it loaded and where it listens, and Ctrl-C stops it
cleanly (one `moska serve` for both: each start costs seconds of imports and model load).

Blocks are found by what they call: a bash block with `curl` (the HTTP API) or a python
block importing `openai` or `moska` (the Python API). `127.0.0.1:8000` is rewritten to the
test server's port and `"moska-tiny"` to its served name (`--served-model-name tiny`: the
flag is checked end to end here; the default name is the model directory's, asserted in the
startup log). The demo library is built small beforehand (the real one takes a
minute of CPU prefill), under the name the server looks for, so `moska serve` loads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MOSKA = Path(sys.executable).parent / "moska"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
HTTP_MARK = "@@HTTP "


def readme_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def api_examples() -> list[tuple[str, str]]:
    out = []
    for lang, code in readme_blocks():
        if lang == "bash" and re.search(r"^\s*curl\b", code, re.MULTILINE):
            out.append(("curl", code))
        elif lang == "python" and re.search(r"^(from|import) (openai|moska)\b", code, re.MULTILINE):
            out.append(("python", code))
    return out


EXAMPLES = api_examples()


def test_the_readme_has_api_examples_and_its_first_commands_start_the_server():
    kinds = [kind for kind, _ in EXAMPLES]
    assert kinds.count("curl") >= 1 and kinds.count("python") >= 2, kinds
    first, second = (code for lang, code in readme_blocks()[:2])
    assert first.strip() == "bash scripts/setup.sh && .venv/bin/moska serve"
    test_command = ".venv/bin/python -m pytest -q -n 2"  # both cores (pytest-xdist)
    assert second.strip().endswith(test_command)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert test_command in ci, "CI must run the README's test command"


@dataclass
class Served:
    url: str
    log: str  # stderr up to the "serving ... on" line
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`moska serve` on a port the OS picks, with the small demo library."""
    from moska.library.demo import DEMO_LIBRARY_NAME
    from moska.library.manager import LibraryManager
    from moska.model import load_model
    from moska.model.default import default_model_dir

    libs = tmp_path_factory.mktemp("readme-libraries")
    manager = LibraryManager(libs, load_model(default_model_dir()), "cpu")
    text = "MoSKA splits shared context into chunks; a router picks chunks per request. " * 12
    manager.build(DEMO_LIBRARY_NAME, [("demo.md", text)], chunk_size=64)

    home = str(tmp_path_factory.mktemp("moska-home"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOSKA_HOME": home}
    env.pop("TRITON_INTERPRET", None)
    args = ["serve", "--port", "0", "--library-root", str(libs), "--num-kv-blocks", "512"]
    args += ["--max-model-len", "1024", "--max-tokens-default", "32"]
    args += ["--served-model-name", "tiny"]
    args += ["--ttft-slo", "0"]  # no 429s because this CI box is busy
    proc = subprocess.Popen(
        [str(MOSKA), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        url, log = None, []
        while url is None:
            line = proc.stderr.readline()  # blocks until the server logs a line
            if not line:
                pytest.fail("moska serve exited:\n" + "".join(log))
            log.append(line)
            if m := re.search(r"serving tiny on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert f"library {DEMO_LIBRARY_NAME}:" in "".join(log)  # the server loaded our demo
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            time.sleep(0.05)
        yield Served(url, "".join(log), proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


def _for_server(code: str, url: str) -> str:
    code = code.replace("http://127.0.0.1:8000", url).replace("http://localhost:8000", url)
    return code.replace('"moska-tiny"', '"tiny"')


def _check_json_response(body: dict) -> None:
    assert "error" not in body, body
    if "tokens" in body:  # /tokenize
        assert body["count"] == len(body["tokens"]) > 0
        assert all(isinstance(t, int) for t in body["tokens"])
        return
    if "prompt" in body:  # /detokenize
        assert isinstance(body["prompt"], str) and body["prompt"]
        return
    assert body["object"] in ("text_completion", "chat.completion", "list"), body
    if body["object"] != "list":
        assert body["choices"], body
        assert body["usage"]["completion_tokens"] >= 1
        choice = body["choices"][0]
        text = choice.get("text", (choice.get("message") or {}).get("content"))
        assert isinstance(text, str)


def _check_sse(body: str) -> None:
    events = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", body[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes, "no choice finished"


def _run_curl_block(code: str, url: str) -> None:
    # Each curl: quiet, fail on HTTP errors (with the body shown), then a status marker.
    script = re.sub(
        r"(^|\n)(\s*)curl ",
        rf"\1\2curl -sS --fail-with-body -w '\\n{HTTP_MARK}%{{http_code}}\\n' ",
        _for_server(code, url),
    )
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{code}\n-> {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    parts = re.split(rf"\n{HTTP_MARK}(\d+)\n", proc.stdout)
    bodies, statuses = parts[0::2][:-1], parts[1::2]
    assert len(statuses) == len(re.findall(r"(^|\n)\s*curl ", code)), proc.stdout[-2000:]
    for status, body in zip(statuses, bodies, strict=True):
        assert status == "200", body
        if body.lstrip().startswith("{"):
            _check_json_response(json.loads(body))
        else:
            _check_sse(body)


def _run_python_block(code: str, url: str) -> None:
    """Run in this process (torch is imported already: a subprocess would pay for it
    again), with a fresh namespace that is dropped afterwards, freeing what it built."""
    out = io.StringIO()
    namespace: dict = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(out):
        exec(compile(_for_server(code, url), str(README), "exec"), namespace)  # noqa: S102
    namespace.clear()
    assert out.getvalue().strip(), "the example printed nothing"


@pytest.mark.parametrize(
    "kind, code", EXAMPLES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(EXAMPLES)]
)
def test_readme_example_runs(kind, code, server):
    if kind == "curl":
        _run_curl_block(code, server)
    else:
        _run_python_block(code, server)


def test_startup_logs_what_was_loaded_and_the_address(served):
    """(Was tests/test_cli_serve.py's own server; no libraries there, the demo one here: the
    'no libraries loaded' line is checked in tests/test_cli_serve.py, in process.)"""
    log = served.log
    assert re.search(r"model \S+moska-tiny\S*: LlamaForCausalLM, float32, [\d.]+M param", log)
    assert re.search(r"device cpu; weights [\d.]+ MiB, KV cache [\d.]+ MiB \(512 blocks", log)
    assert "context 1024 tokens" in log
    assert re.search(r"library demo: \d+ tokens in \d+ chunks", log), log
    # engine/memory.py's plan: every part, and the library cache once libraries loaded
    assert re.search(r"memory budget [\d.]+ GiB on cpu", log), log
    for part in ("weights", "activations", "CUDA graphs", "unique KV", "library cache"):
        assert re.search(rf"  {part} [\d.]+ [MG]iB", log), part
    assert re.search(r"library cache: [\d.]+ [KMG]iB of [\d.]+ GiB held by 1 loaded", log), log
    r = httpx.get(f"{served.url}/v1/models", timeout=5)
    assert r.json()["data"][0]["id"] == "tiny"
    assert r.json()["data"][0]["max_model_len"] == 1024


def test_ctrl_c_stops_the_server_cleanly(served):
    """Last in this module: it ends the shared server."""
    served.proc.send_signal(signal.SIGINT)
    served.proc.wait(30)
    assert served.proc.returncode in (0, 130), served.proc.returncode  # 130: uvicorn re-raises
    assert "Traceback" not in served.proc.stderr.read()
