"""The command line of #18's launches: `python -m moska` (what `torchrun -m moska` runs),
the flags' help, and tensor parallelism with shared-KV ranks accepted (a combination not
served, shared-KV ranks with decode context parallelism, is refused before any process
starts: test_shared_kv_engine.py)."""

from __future__ import annotations

import runpy
import sys

import pytest

from moska.cli import build_parser


def test_python_dash_m_moska_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["moska", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("moska", run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("moska ")


def test_serve_help_names_torchrun_and_tp_with_shared_kv_ranks(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "torchrun --nproc-per-node N -m moska" in text
    assert "With --tensor-parallel-size N the N TP ranks do" in text


def test_tensor_parallel_with_shared_kv_ranks_is_accepted():
    """The flags reach the engine's config as given (the 3-process engine itself:
    test_tp_shared_kv_engine.py)."""
    from moska.cli import _engine_kwargs
    from moska.config import EngineConfig

    argv = ["serve", "--device", "cpu", "--tensor-parallel-size", "2", "--shared-kv-ranks", "1"]
    config = EngineConfig(**_engine_kwargs(build_parser().parse_args(argv)))
    assert (config.tensor_parallel_size, config.shared_kv_ranks) == (2, 1)
