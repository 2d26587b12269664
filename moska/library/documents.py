"""Reading source documents for a library: .txt, .md, .jsonl files and directories.

A document is a ``(name, text)`` pair. Directories expand to their supported files in
sorted order (hidden files skipped). Every failure raises ``DocumentError`` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moska.library.errors import DocumentError

# plain text, and source code (a codebase is a library): read as UTF-8 text, one document each
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
CODE_SUFFIXES = (
    ".py", ".pyi", ".ipynb", ".js", ".jsx", ".ts", ".tsx", ".go", ".rs", ".java", ".kt",
    ".scala", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cs", ".rb", ".php", ".swift",
    ".m", ".sh", ".sql", ".r", ".jl", ".lua", ".html", ".css", ".toml", ".yaml", ".yml",
    ".json", ".xml", ".proto", ".tex",
)  # fmt: skip
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + CODE_SUFFIXES + JSONL_SUFFIXES

Document = tuple[str, str]  # (name, text)


def read_documents(
    paths: list[str | os.PathLike] | str | os.PathLike, *, jsonl_field: str = "text"
) -> list[Document]:
    """Read every document under ``paths`` (files or directories) in order.

    ``.jsonl`` files give one document per non-blank line, from the field ``jsonl_field``;
    their names are ``file:line``. Raises ``DocumentError`` if a path is missing or
    unreadable, a file is empty or of an unsupported type, or a JSONL line lacks the field.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DocumentError("no document paths given: pass at least one file or directory")
    documents: list[Document] = []
    for path in map(Path, paths):
        if path.is_dir():  # a folder (a codebase): names relative to it; empty files skipped
            for file in _expand(path):
                if file.stat().st_size:
                    name = file.relative_to(path).as_posix()
                    documents.extend(_read_file(file, jsonl_field, name))
        else:
            documents.extend(_read_file(next(iter(_expand(path))), jsonl_field))
    return documents


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise DocumentError(f"{path}: no such file or directory; check the path")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DocumentError(f"{path}: not a regular file or directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DocumentError(
            f"{path}: directory holds no text, source code or .jsonl files; "
            "add documents or pass the files directly"
        )
    return files


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{file}: not valid UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DocumentError(f"{file}: cannot read ({e.strerror}); check its permissions") from e


def _read_file(file: Path, jsonl_field: str, name: str | None = None) -> list[Document]:
    name = name or file.name
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentError(
            f"{file}: unsupported file type {suffix or '(none)'!r}; use text "
            f"({', '.join(TEXT_SUFFIXES)}), source code (.py, .js, .go, ...) or .jsonl"
        )
    text = _read_text(file)
    if not text.strip():
        raise DocumentError(f"{file}: file is empty; remove it from the inputs")
    if suffix not in JSONL_SUFFIXES:
        return [(name, text)]
    documents = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from e
        if not isinstance(record, dict) or jsonl_field not in record:
            raise DocumentError(
                f"{where}: no field {jsonl_field!r}; add it or choose the field that holds "
                "the text (--jsonl-field)"
            )
        value = record[jsonl_field]
        if not isinstance(value, str):
            raise DocumentError(f"{where}: field {jsonl_field!r} is not a string")
        if not value.strip():
            raise DocumentError(f"{where}: field {jsonl_field!r} is empty")
        documents.append((f"{name}:{lineno}", value))
    return documents


def demo_documents() -> list[Document]:
    """The small demo corpus bundled with moska (``moska/data/demo_library/*.md``)."""
    root = Path(__file__).resolve().parent.parent / "data" / "demo_library"
    return read_documents(root)
