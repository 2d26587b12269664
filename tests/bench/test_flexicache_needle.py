"""moska.bench.flexicache_needle: the needle window keeps its length, holds the definition
after a line's end, and scores exactly the assert line's value and closing quote; the kept
share is 1 at full KV's NLL and 0 at the control's."""

import pytest

from moska.bench.flexicache_needle import kept_share, needle_window
from moska.model.default import default_model_dir
from moska.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(default_model_dir())


def _window(tok) -> list[int]:
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(60))
    return tok.encode(text, add_special_tokens=False)[:400]


def test_needle_window_layout(tok):
    w = _window(tok)
    ids, scored, at = needle_window(tok, w, "_K_1", "0a1b2c", "0a1b2c", 50, 300)
    assert len(ids) == len(w)
    assert at >= 51 and tok.decode([w[at - 1]]).endswith("\n")  # after a line's end
    assert ids[:at] == w[:at]
    assert tok.decode(ids[at:]).startswith('\n_K_1 = "0a1b2c"\n')
    assert tok.decode(ids).endswith('\nassert _K_1 == "0a1b2c"\n')
    assert tok.decode([ids[p] for p in scored]) == '0a1b2c"'
    assert scored == list(range(scored[0], len(ids) - 1))  # the value, its quote: the end
    ctrl, scored_c, at_c = needle_window(tok, w, "_K_1", "0a1b2c", "ffffff", 50, 300)
    assert (scored_c, at_c, len(ctrl)) == (scored, at, len(ids))
    assert [ctrl[p] for p in scored] == [ids[p] for p in scored]  # the same assert line
    assert '"ffffff"' in tok.decode(ctrl) and '_K_1 = "0a1b2c"' not in tok.decode(ctrl)


def test_no_line_end_in_range_is_refused(tok):
    w = tok.encode("x" * 2000, add_special_tokens=False)[:300]
    with pytest.raises(ValueError, match="no newline"):
        needle_window(tok, w, "_K", "01", "01", 10, 200)


def test_kept_share():
    assert kept_share(control=5.0, full=1.0, got=1.0) == 1.0
    assert kept_share(control=5.0, full=1.0, got=5.0) == 0.0
    assert kept_share(control=5.0, full=1.0, got=3.0) == 0.5
    assert kept_share(control=1.0, full=1.0, got=0.5) is None  # no benefit to keep
