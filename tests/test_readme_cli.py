"""Every `moska ...` command line in README.md's bash blocks parses with today's `moska`
parser (flags, subcommands and choices as the code spells them), and every `--flag` the
README names anywhere is a flag of some moska command or benchmark. The HTTP and Python
examples run for real in tests/test_readme_examples.py; these only parse (milliseconds)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from moska.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"^\s*(?:\.venv/bin/)?moska\s+(.*)$")


def command_lines(text: str) -> list[str]:
    """The arguments of each `moska` line of the bash blocks (continuations joined)."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "bash":
            continue
        for line in re.sub(r"\\\n\s*", " ", m.group(2)).splitlines():
            if cmd := COMMAND.match(line):
                out.append(cmd.group(1))
    return out


def every_flag(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= every_flag(sub)
    return out


LINES = command_lines(README)


def test_the_readme_has_command_lines():
    assert len(LINES) >= 5 and any(line.startswith("serve") for line in LINES), LINES


@pytest.mark.parametrize("line", LINES)
def test_each_command_line_parses(line):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(shlex.split(line, comments=True))
    except SystemExit as e:
        pytest.fail(f"`moska {line}` does not parse ({e.code}): {err.getvalue().strip()}")


def test_every_flag_the_readme_names_exists():
    known = every_flag(build_parser())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", README))
    sources = [p.read_text() for d in ("moska", "bench") for p in (ROOT / d).rglob("*.py")]
    sources += [p.read_text() for p in (ROOT / "bench").glob("*.sh")]
    elsewhere = {f for f in named - known if any(f'"{f}"' in s for s in sources)}
    # tools' flags the README quotes (ruff, torchrun) and a flag it says moska does not take
    outside = {"--check", "--nproc-per-node", "--quantization"}
    assert named - known - elsewhere - outside == set()


def test_the_checks_catch_a_wrong_flag():
    lines = command_lines("```bash\n.venv/bin/moska serve MODEL \\\n  --no-such-flag 1\n```\n")
    assert [line.split() for line in lines] == [["serve", "MODEL", "--no-such-flag", "1"]]
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(shlex.split(lines[0]))
    assert "--no-such-flag" not in every_flag(build_parser())
