"""Safetensors checkpoint directories, tensor by tensor: `SafetensorsReader` (one file, several, or sharded with
`model.safetensors.index.json`; fp8 tensors dequantized on read) and `ShardWriter` (the files `save_pretrained` writes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxopd.hf.fp8 import dequantize_fp8_blockwise

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint directory (config.json, the shard index), errors naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); a Hugging Face checkpoint directory needs a JSON "
                         "config.json (and index, if sharded)") from error


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="np")
    except Exception as error:  # e.g. "Error while deserializing header", without the file's name
        raise ValueError(f"{file} is not a readable safetensors file ({type(error).__name__}: {error}); it may be "
                         "truncated or damaged") from error


class SafetensorsReader:
    """Tensor-by-tensor access to the safetensors files of one checkpoint directory (single file or sharded).

    `file_of` maps every stored tensor name to its file, `where` names the files (for error messages), and
    `quantized` holds the names stored as fp8 with a `name + "_scale_inv"` beside them.
    """

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if index.exists():
            weight_map = read_json(index)["weight_map"]
            self.where = str(index)
            self.file_of = {name: path / file for name, file in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors files (and no {INDEX_FILE}) in {path}")
            self.where = ", ".join(str(f) for f in files)
            self.file_of = {}
            for file in files:
                with _open(file) as handle:
                    self.file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.quantized = {name[: -len("_scale_inv")] for name in self.file_of if name.endswith("_scale_inv")}

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            if not file.exists():
                raise ValueError(f"{self.where} names shard {file}, which does not exist")
            self._handles[file] = _open(file)
        return self._handles[file]

    def _raw(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        handle = self._handle(file)
        if name not in handle.keys():
            raise ValueError(f"tensor {name!r} is listed in {self.where} but missing from {file}")
        try:
            if handle.get_slice(name).get_dtype() == "F8_E4M3":
                return self._read_float8(file, name)  # numpy has no float8 type for safetensors to hand back
            return handle.get_tensor(name)
        except Exception as error:  # safetensors' own errors name neither the file nor the tensor
            raise ValueError(f"{file}: tensor {name!r} does not read ({type(error).__name__}: {error}); the file "
                             "may be truncated or damaged") from error

    def _read_float8(self, file: Path, name: str) -> np.ndarray:
        # safetensors layout: 8-byte little-endian header size, JSON header, then raw little-endian tensor bytes.
        if file not in self._headers:
            with open(file, "rb") as stream:
                header_size = int.from_bytes(stream.read(8), "little")
                self._headers[file] = (8 + header_size, json.loads(stream.read(header_size)))
        data_start, header = self._headers[file]
        begin, _ = header[name]["data_offsets"]
        shape = header[name]["shape"]
        data = np.fromfile(file, dtype=ml_dtypes.float8_e4m3fn, count=math.prod(shape), offset=data_start + begin)
        return data.reshape(shape)

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype tag of tensor `name` ("F32", "BF16", "F8_E4M3", ...), its data not read."""
        return self._handle(self.file_of[name]).get_slice(name).get_dtype()

    def read(self, name: str, block: Sequence[int]) -> np.ndarray:
        """The tensor `name`, dequantized to float32 if the checkpoint stores `name + "_scale_inv"` beside it."""
        if name in self.quantized:
            return dequantize_fp8_blockwise(self._raw(name), self._raw(name + "_scale_inv"), block)
        return self._raw(name)


class ShardWriter:
    """Writes tensors into numbered safetensors files of at most `max_shard_bytes` (a larger single tensor gets
    its own file), named and indexed the way `save_pretrained` does."""

    def __init__(self, path: Path, max_shard_bytes: int):
        self.path, self.max_shard_bytes = path, max_shard_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = np.ascontiguousarray(tensor)
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.path / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.path / "shard-00000.tmp", self.path / "model.safetensors")
            return
        weight_map = {}
        for number, names in enumerate(self.shards):
            file = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.path / f"shard-{number:05d}.tmp", self.path / file)
            weight_map.update({name: file for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2))
