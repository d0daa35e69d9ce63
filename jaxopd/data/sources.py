"""Random-access document sources: every source maps a document index to the document's raw UTF-8 bytes.

Bytes, not str, so that invalid UTF-8 reaches the tokenization step intact, where it is replaced and counted.
Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) and picklable, so grain workers can
read from it. Random access lets grain shuffle the whole corpus with one seed and shard it by process.

- "text": plain text files, one document per file, or documents separated by `separator` inside each file.
- "jsonl": JSON Lines (optionally .gz) with the document in `text_field` (and its untrained prompt in
  `prompt_field`, when given: then a document is the pair of their bytes).
- "array_record": ArrayRecord files whose records are the documents' UTF-8 bytes.
- "parquet": Parquet files with the document in the `text_field` column (needs pyarrow).
"""

from __future__ import annotations

import bisect
import glob
import gzip
import json
import os
from collections.abc import Sequence

import numpy as np

SOURCE_KINDS = ("text", "jsonl", "array_record", "parquet")


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Glob patterns (a comma-separated string or a list) to a sorted file list; ValueError if nothing matches."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ValueError(f"data path {pattern!r} matches no file; set data.paths to existing files or globs")
        paths.extend(matches)
    return paths


def _read(path: str) -> bytes:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return f.read()


class _ByteRangeSource:
    """Documents as byte ranges of files found by `split_file(content) -> (start, end) pairs`. Plain files are read
    with one seek per document; gzipped files are decompressed into memory once (fine for small corpora; use
    ArrayRecord or Parquet for large ones)."""

    def __init__(self, paths: list[str], split_file):
        self.paths = paths
        self._in_memory = {i: _read(p) for i, p in enumerate(paths) if p.endswith(".gz")}
        file_ids, starts, ends = [], [], []
        for file_id, path in enumerate(paths):
            content = self._in_memory[file_id] if file_id in self._in_memory else _read(path)
            for start, end in split_file(content):
                file_ids.append(file_id)
                starts.append(start)
                ends.append(end)
        self.file_ids = np.asarray(file_ids, np.int32)
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> bytes:
        file_id, start, end = int(self.file_ids[index]), int(self.starts[index]), int(self.ends[index])
        if file_id in self._in_memory:
            return self._in_memory[file_id][start:end]
        with open(self.paths[file_id], "rb") as f:
            f.seek(start)
            return f.read(end - start)


def text_source(paths: list[str], separator: str | None = None) -> _ByteRangeSource:
    """One document per file, or documents separated by `separator` (empty pieces are kept and counted later)."""
    if separator == "":
        raise ValueError("data.separator='' would split every byte; use None for one document per file")
    sep = None if separator is None else separator.encode("utf-8")

    def split_file(content: bytes):
        if sep is None:
            yield 0, len(content)
            return
        start = 0
        while (found := content.find(sep, start)) >= 0:
            yield start, found
            start = found + len(sep)
        yield start, len(content)

    return _ByteRangeSource(paths, split_file)


def _line_ranges(content: bytes):
    start = 0
    for line in content.split(b"\n"):
        if line.strip():
            yield start, start + len(line)
        start += len(line) + 1


class JsonlSource(_ByteRangeSource):
    """JSON Lines (optionally .gz) with the document in `text_field`; blank lines are not documents. With
    `prompt_field` a document is the pair (that field's bytes, `text_field`'s bytes): a prompt, not trained on, and
    its completion (data.prompt_field)."""

    def __init__(self, paths: list[str], text_field: str = "text", prompt_field: str | None = None):
        super().__init__(paths, _line_ranges)
        self.text_field, self.prompt_field = text_field, prompt_field

    def __getitem__(self, index: int) -> bytes | tuple[bytes, bytes]:
        line = super().__getitem__(index)
        # surrogateescape keeps invalid UTF-8 bytes through json.loads, so they are counted downstream.
        try:
            row = json.loads(line.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as error:
            raise ValueError(f"document {index} ({self.paths[self.file_ids[index]]}, byte {self.starts[index]}): "
                             f"not JSON ({error!r})") from error
        text = self._field(row, self.text_field, "text_field", index)
        return text if self.prompt_field is None else (self._field(row, self.prompt_field, "prompt_field", index),
                                                       text)

    def _field(self, row, field: str, key: str, index: int) -> bytes:
        """`row[field]` as bytes; `key` is the data.* option naming the field, for the error."""
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"document {index} ({self.paths[self.file_ids[index]]}, byte {self.starts[index]}): not "
                             f"a JSON object with a string field {field!r}; set data.{key}")
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates written as \ud800 escapes: pass them on as invalid UTF-8
            return value.encode("utf-8", "surrogatepass")


class ParquetSource:
    """Parquet files with the document in column `text_field`, read one row group at a time (the last one is kept)."""

    def __init__(self, paths: list[str], text_field: str = "text"):
        try:  # imported here: only this source needs pyarrow
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError("data.source='parquet' needs pyarrow: pip install pyarrow") from error

        self.paths, self.text_field = paths, text_field
        self._group_starts, self._groups = [], []  # cumulative row offsets, (file, row group)
        total = 0
        for file_id, path in enumerate(paths):
            metadata = pq.ParquetFile(path).metadata
            if text_field not in metadata.schema.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns {metadata.schema.names}); "
                                 "set data.text_field")
            for group in range(metadata.num_row_groups):
                self._group_starts.append(total)
                self._groups.append((file_id, group))
                total += metadata.row_group(group).num_rows
        self._length = total
        self._cache: tuple[int, list] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> bytes:
        import pyarrow.parquet as pq

        group_index = bisect.bisect_right(self._group_starts, index) - 1
        if self._cache is None or self._cache[0] != group_index:
            file_id, group = self._groups[group_index]
            table = pq.ParquetFile(self.paths[file_id]).read_row_group(group, columns=[self.text_field])
            self._cache = (group_index, table.column(self.text_field).to_pylist())
        value = self._cache[1][index - self._group_starts[group_index]]
        if value is None:
            return b""
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def open_source(kind: str, paths: str | Sequence[str], *, text_field: str = "text", separator: str | None = None,
                prompt_field: str | None = None):
    """The random-access source of one kind over the files `paths` (globs allowed); `prompt_field` is jsonl's."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.source={kind!r} is not one of {SOURCE_KINDS}")
    files = expand_paths(paths)
    if kind == "text":
        return text_source(files, separator)
    if kind == "jsonl":
        return JsonlSource(files, text_field, prompt_field)
    if kind == "parquet":
        return ParquetSource(files, text_field)
    import grain

    return grain.sources.ArrayRecordDataSource(files)
