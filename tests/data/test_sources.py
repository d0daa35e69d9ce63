import gzip
import json
import sys

import pytest

from jaxopd.data.sources import expand_paths, open_source


def test_text_one_document_per_file(tmp_path):
    for name, content in [("b.txt", b"second"), ("a.txt", b"first\n\nfile"), ("c.txt", b"")]:
        (tmp_path / name).write_bytes(content)
    source = open_source("text", str(tmp_path / "*.txt"))
    assert [source[i] for i in range(len(source))] == [b"first\n\nfile", b"second", b""]


def test_text_with_separator_keeps_empty_pieces(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one<|sep|>two\xff<|sep|><|sep|>three")
    (tmp_path / "b.txt").write_bytes(b"four")
    source = open_source("text", [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], separator="<|sep|>")
    assert [source[i] for i in range(len(source))] == [b"one", b"two\xff", b"", b"three", b"four"]
    with pytest.raises(ValueError, match="separator"):
        open_source("text", str(tmp_path / "a.txt"), separator="")


@pytest.mark.parametrize("compressed", [False, True])
def test_jsonl_with_text_field(tmp_path, compressed):
    lines = [json.dumps({"content": "héllo", "id": 1}), "", json.dumps({"content": "", "id": 2})]
    data = ("\n".join(lines) + "\n").encode() + b'{"content": "bad \xff byte"}\n'
    path = tmp_path / ("d.jsonl.gz" if compressed else "d.jsonl")
    path.write_bytes(gzip.compress(data) if compressed else data)
    source = open_source("jsonl", str(path), text_field="content")
    # The blank line is not a document; invalid UTF-8 passes through as the original bytes.
    assert [source[i] for i in range(len(source))] == ["héllo".encode(), b"", b"bad \xff byte"]


def test_jsonl_missing_field_names_the_document(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    source = open_source("jsonl", str(path))
    with pytest.raises(ValueError, match="document 1 .*'text'"):
        source[1]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i}" for i in range(10)]
    pq.write_table(pa.table({"text": texts[:7]}), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"text": texts[7:]}), tmp_path / "b.parquet")
    source = open_source("parquet", str(tmp_path / "*.parquet"))
    assert [source[i].decode() for i in [9, 0, 5, 3, 7]] == [texts[i] for i in [9, 0, 5, 3, 7]]
    assert len(source) == 10
    with pytest.raises(ValueError, match="no column 'body'"):
        open_source("parquet", str(tmp_path / "a.parquet"), text_field="body")


def test_array_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    records = [b"alpha", b"", "βeta".encode(), b"\xff"]
    for record in records:
        writer.write(record)
    writer.close()
    source = open_source("array_record", str(tmp_path / "d.array_record"))
    assert [source[i] for i in range(len(source))] == records


def test_bad_kind_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        open_source("csv", str(tmp_path))
    with pytest.raises(ValueError, match="matches no file"):
        expand_paths(str(tmp_path / "nothing*.jsonl"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        open_source("parquet", str(tmp_path / "d.parquet"))
