"""Near-duplicate code prompts for SemShareKV: held-out files (networkx, sympy in .venv)
and their variants — identifiers renamed, top-level functions reordered, docstrings
reworded, or a sibling file of the same folder.

Every transform works on the source text (tokenize / ast), is seeded, and returns None
when it does not apply (a file without two top-level definitions cannot be reordered).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import io
import keyword
import random
import re
import tokenize
from pathlib import Path

PACKAGES = ("networkx", "sympy")
MAX_FILE_BYTES = 200_000
KINDS = ("rename", "reorder", "reword", "sibling")

_NAMES = ("data", "result", "value", "item", "node", "graph", "expr", "obj", "tmp", "out",
          "arg", "elem", "seq", "key", "count", "total", "entry", "edge", "term", "coeff",
          "base", "other", "flag", "info")  # fmt: skip
_WORDS = {"Return": "Give back", "return": "give back", "Returns": "Gives back",
          "the": "this", "is": "will be", "of": "for", "a": "one", "if": "when",
          "Parameters": "Arguments", "Examples": "Usage", "given": "supplied",
          "number": "count", "function": "routine", "list": "sequence", "be": "get"}  # fmt: skip


def heldout_files(packages=PACKAGES) -> list[Path]:
    """Sorted .py files of the held-out packages (training's size filter applied)."""
    out = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{pkg} is not installed in this venv: it is the held-out text")
        base = Path(next(iter(spec.submodule_search_locations)))
        out += sorted(p for p in base.rglob("*.py") if 0 < p.stat().st_size <= MAX_FILE_BYTES)
    return out


def _defined_names(tree: ast.AST) -> list[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    skip = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}
    return sorted(n for n in names if n not in skip and len(n) > 1 and not n.startswith("__"))


def rename(text: str, seed: int, share: float = 0.5) -> str | None:
    """Rename `share` of the identifiers the file defines, consistently, to plain names."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    rng = random.Random(seed)
    names = _defined_names(tree)
    if not names:
        return None
    chosen = rng.sample(names, max(1, int(share * len(names))))
    taken = set(names)
    mapping = {}
    for n in chosen:
        for _ in range(100):
            new = f"{rng.choice(_NAMES)}{rng.randrange(10)}"
            if new not in taken:
                break
        taken.add(new)
        mapping[n] = new
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME and tok.string in mapping:
                tok = tok._replace(string=mapping[tok.string])
            out.append(tok)
        return tokenize.untokenize(out)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def reorder(text: str, seed: int) -> str | None:
    """Shuffle the top-level function and class definitions among their places."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    lines = text.splitlines(keepends=True)
    spans = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            spans.append((first, node.end_lineno))
    if len(spans) < 2:
        return None
    blocks = ["".join(lines[a:b]) for a, b in spans]
    order = list(range(len(blocks)))
    rng = random.Random(seed)
    while order == sorted(order):
        rng.shuffle(order)
    out, prev = [], 0
    for (a, b), j in zip(spans, order):
        out.append("".join(lines[prev:a]))
        out.append(blocks[j])
        prev = b
    out.append("".join(lines[prev:]))
    return "".join(out)


def reword(text: str, seed: int, share: float = 0.7) -> str | None:
    """Reword the docstrings: common words swapped for others (`share` of occurrences)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    rng = random.Random(seed)
    lines = text.splitlines(keepends=True)
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                spans.append((first.lineno - 1, first.end_lineno))
    if not spans:
        return None
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, _WORDS)) + r")\b")

    def swap(m):
        return _WORDS[m.group(1)] if rng.random() < share else m.group(1)

    for a, b in spans:
        for i in range(a, b):
            lines[i] = pattern.sub(swap, lines[i])
    return "".join(lines)


def sibling(path: Path, files_by_dir: dict[Path, list[Path]]) -> str | None:
    """The text of another file of the same folder (the nearest by name)."""
    others = [p for p in files_by_dir.get(path.parent, []) if p != path]
    if not others:
        return None
    names = sorted(others, key=lambda p: p.name)
    nxt = next((p for p in names if p.name > path.name), names[0])
    try:
        return nxt.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def variant(kind: str, path: Path, text: str, seed: int, files_by_dir) -> str | None:
    if kind == "rename":
        return rename(text, seed)
    if kind == "reorder":
        return reorder(text, seed)
    if kind == "reword":
        return reword(text, seed)
    if kind == "sibling":
        return sibling(path, files_by_dir)
    raise ValueError(f"unknown variant kind {kind!r}; one of {KINDS}")
