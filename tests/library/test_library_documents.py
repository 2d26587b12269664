import json

import pytest

from moska.library import DocumentError, demo_documents, read_documents


def test_reads_text_markdown_jsonl_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.md").write_text("# B\nbee")
    (tmp_path / "d" / "a.txt").write_text("ay")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0")
    (tmp_path / "d" / ".hidden.md").write_text("secret")
    lines = [json.dumps({"text": "one"}), "", json.dumps({"body": "two", "text": "two"})]
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    docs = read_documents([tmp_path / "d", tmp_path / "x.jsonl"])
    assert docs == [
        ("a.txt", "ay"),
        ("b.md", "# B\nbee"),
        ("x.jsonl:1", "one"),
        ("x.jsonl:3", "two"),
    ]


def test_jsonl_custom_field_and_missing_field_names_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    g = tmp_path / "ok.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(g, jsonl_field="body") == [("ok.jsonl:1", "x")]
    with pytest.raises(DocumentError, match=r"r\.jsonl:2: no field 'body'"):
        read_documents(f, jsonl_field="body")
    with pytest.raises(DocumentError, match=r"r\.jsonl:1: no field 'text'"):
        read_documents(f)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("  \n"), "empty"),
        (lambda p: p.write_bytes(b"\xff\xfe bad"), "UTF-8"),
    ],
)
def test_file_errors_name_the_file(tmp_path, setup, match):
    p = tmp_path / "doc.txt"
    setup(p)
    with pytest.raises(DocumentError, match=match) as e:
        read_documents([p])
    assert "doc.txt" in str(e.value)


def test_bad_json_unsupported_type_and_empty_dir(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DocumentError, match=r"bad\.jsonl:1: not valid JSON"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(DocumentError, match="unsupported file type"):
        read_documents(tmp_path / "x.pdf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="holds no"):
        read_documents(tmp_path / "empty")
    with pytest.raises(DocumentError):
        read_documents([])
    assert issubclass(DocumentError, ValueError)


def test_demo_corpus_is_bundled():
    docs = demo_documents()
    assert 3 <= len(docs) <= 5
    assert all(text.strip() for _, text in docs)
    assert sum(len(t) for _, t in docs) < 20_000


def test_a_codebase_folder_is_a_library_source(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")  # empty files of a folder are skipped
    (pkg / "core.py").write_text("def f(x):\n    return x + 1\n")
    (pkg / "sub" / "__init__.py").write_text("from ..core import f\n")
    (pkg / "sub" / "logo.png").write_bytes(b"\x89PNG")  # not text: not read
    docs = read_documents(pkg)
    assert [name for name, _ in docs] == ["core.py", "sub/__init__.py"]
    assert docs[0][1].startswith("def f(x)")
    with pytest.raises(DocumentError, match="empty"):  # named directly, an empty file is an error
        read_documents(pkg / "__init__.py")
