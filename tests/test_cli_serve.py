"""`moska serve` as a person runs it (`moska.cli.main`, the installed script's body, each
start in its own process): a busy port, a missing GPU or a Triton backend without one fail
in one line with exit code 2 before any model loads. A good start's log (what was loaded,
where it listens) and its Ctrl-C are checked on the README's server, the installed script
itself (tests/test_readme_examples.py): one `moska serve` for both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
from gloo_ranks import forkserver_context  # the forkserver the distributed tests use

FAIL_FAST_S = 60  # generous for a loaded CI box; a model load would also need the weights


def _serve(argv: list[str], home: str, out: str) -> None:
    """A forkserver child: `moska serve <argv>` with its stdout and stderr in files, its exit
    code the process's."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(HF_HUB_OFFLINE="1", MOSKA_HOME=home)
    for fd, path in ((1, out + ".out"), (2, out + ".err")):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    from moska.cli import main

    code = main(["serve", *argv])
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def fail_fast(tmp_path_factory) -> tuple[int, dict[str, subprocess.CompletedProcess]]:
    """The fail-fast starts, all at once, each a process forked from the forkserver that has
    imported torch and the engine: a `moska` script of its own paid ~3 s of a core for
    Python's and torch's imports, 9 s for the three; the forkserver costs ~6 s once per
    test process, shared with tests/distributed and tests/server/test_build_process.py.
    The busy port stays bound until its start has answered."""
    import torch

    tmp = tmp_path_factory.mktemp("fail-fast")
    ctx = forkserver_context()
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
            name: ctx.Process(target=_serve, args=(args, str(tmp / "home"), str(tmp / name)))
            for name, args in cases.items()
        }
        done = {}
        try:
            for proc in procs.values():
                proc.start()
            for name, proc in procs.items():
                proc.join(FAIL_FAST_S)
                out, err = ((tmp / f"{name}.{x}").read_text() for x in ("out", "err"))
                done[name] = subprocess.CompletedProcess(cases[name], proc.exitcode, out, err)
        finally:
            for proc in procs.values():
                if proc.is_alive():
                    proc.kill()
                    proc.join()
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
