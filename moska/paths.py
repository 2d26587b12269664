"""Where moska keeps its files: $MOSKA_HOME, else ~/.cache/moska."""

from __future__ import annotations

import os
from pathlib import Path


def moska_home() -> Path:
    env = os.environ.get("MOSKA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moska"
