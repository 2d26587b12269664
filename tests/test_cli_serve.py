"""`moska serve` as a person runs it (subprocesses of the installed `moska` script): a busy
port, a missing GPU or a Triton backend without one fail in one line with exit code 2 before
any model loads. A good start's log (what was loaded, where it listens) and its Ctrl-C are
checked on the README's server (tests/test_readme_examples.py): one `moska serve` for both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

MOSKA = Path(sys.executable).parent / "moska"
FAIL_FAST_S = 60  # generous for a loaded CI box; a model load would also need the weights


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", MOSKA_HOME=str(tmp_path_factory.mktemp("moska-home")))
    return env


@pytest.fixture(scope="module")
def fail_fast(env) -> tuple[int, dict[str, subprocess.CompletedProcess]]:
    """The fail-fast starts, all at once: each pays for Python's and torch's imports (about
    3 s of a core), so one after the other they took twice the time of running them side by
    side on 2 cores. The busy port stays bound until its start has answered."""
    import torch

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "busy": ["--port", str(port)],
            "triton": ["--port", "0", "--device", "cpu", "--attention", "triton"],
        }
        if not torch.cuda.is_available():
            cases["cuda"] = ["--port", "0", "--device", "cuda"]
        procs = {
            name: subprocess.Popen(
                [str(MOSKA), "serve", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, args in cases.items()
        }
        done = {}
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=FAIL_FAST_S)
                done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return port, done


def _fails_in_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "loading model" not in proc.stderr  # it failed before the model load began
    assert lines[0].startswith("moska: error: ")
    return lines[0]


def test_busy_port_fails_before_the_model_loads(fail_fast):
    port, done = fail_fast
    line = _fails_in_one_line(done["busy"])
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_cuda_without_cuda_fails_in_one_line(fail_fast):
    _, done = fail_fast
    if "cuda" not in done:
        pytest.skip("this machine has CUDA")
    line = _fails_in_one_line(done["cuda"])
    assert "CUDA" in line and "--device cpu" in line


def test_triton_attention_without_a_gpu_fails_in_one_line(fail_fast):
    _, done = fail_fast
    line = _fails_in_one_line(done["triton"])
    assert "triton" in line and "GPU" in line


def test_demo_library_build_has_a_labelled_progress_bar(capsys, monkeypatch):
    from moska.server.serve import prepare_libraries

    class Manager:
        def __init__(self) -> None:
            self.built: list[str] = []

        def exists(self, name):
            return name in self.built

        def get(self, name):
            assert name in self.built
            return type("Lib", (), {"num_tokens": 10, "num_chunks": 2, "nbytes": 1 << 20})()

        def loaded_names(self):
            return list(self.built)

    class Engine:
        libraries = Manager()

    def ensure(manager):
        manager.built.append("demo")
        return type("Info", (), {"name": "demo"})()

    from moska.library import demo

    monkeypatch.setattr(demo, "ensure_demo_library", ensure)
    prepare_libraries(Engine(), [], demo=True)
    assert "building the demo library (first start only)" in capsys.readouterr().err
    prepare_libraries(Engine(), [], demo=True)  # the second start finds it built
    assert "first start only" not in capsys.readouterr().err


def test_a_start_without_libraries_says_so(caplog):
    """(The README's server loads the demo library: this line is checked here, in process.)"""
    from moska.server.serve import prepare_libraries

    class Manager:
        root = "/libs"

        def loaded_names(self):
            return []

    class Engine:
        libraries = Manager()

    with caplog.at_level("INFO", logger="moska.server.serve"):
        prepare_libraries(Engine(), [], demo=False)
    assert "no libraries loaded (root /libs)" in caplog.text
