"""Session-wide test settings: nothing downloaded, moska's files in a temporary home."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "MOSKA_HOME" not in os.environ:
    os.environ["MOSKA_HOME"] = tempfile.mkdtemp(prefix="moska-test-home-")
