"""Hugging Face checkpoints in and out: `load_hf(path) -> (model, params)` and `save_hf(model, params, path)`.

Loading reads `config.json`, translates it (`jaxopd.hf.config`), then fills the model's parameters one at a time:
each of our parameters is built in one preallocated host buffer from its Hugging Face tensors (per-expert tensors are
written straight into their slice of the stacked `[experts, ...]` buffer), placed on its sharding, and dropped from the
host before the next one is read — so the host never holds the model twice. DeepSeek's block-wise fp8 weights are
dequantized on the way (`dequantize_fp8_blockwise`). Which tensor goes where is `jaxopd.hf.mapping`.

Saving writes `config.json` and safetensors shards (with `model.safetensors.index.json` when there is more than one)
in the layout transformers' `AutoModelForCausalLM.from_pretrained` reads, per-expert tensors included.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxopd.hf.config import config_from_hf, config_to_hf
from jaxopd.hf.mapping import Entry, ignorable, param_entries, shared_copies

if TYPE_CHECKING:
    from jaxopd.model import Transformer

INDEX_FILE = "model.safetensors.index.json"
_FP8_BLOCK = (128, 128)


def dequantize_fp8_blockwise(weight: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = _FP8_BLOCK) -> np.ndarray:
    """float32 `weight * scale_inv`, one scale per `block` tile (DeepSeek-V3 fp8 format; edge tiles are partial).

    Args:
      weight: `[rows, cols]` float8_e4m3fn (or any float) weight.
      scale_inv: `[ceil(rows / block[0]), ceil(cols / block[1])]` per-tile multipliers.
    Returns: `[rows, cols]` float32.
    """
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if scale_inv.shape != expected:
        raise ValueError(f"fp8 scale_inv shape {scale_inv.shape} does not tile weight {weight.shape} in {tuple(block)} "
                         f"blocks; expected {expected}")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
    return weight.astype(np.float32) * scale


class _Checkpoint:
    """Tensor-by-tensor access to the safetensors files of one checkpoint directory (single file or sharded)."""

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = str(index)
            self.file_of = {name: path / file for name, file in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors files (and no {INDEX_FILE}) in {path}")
            self.where = ", ".join(str(f) for f in files)
            self.file_of = {}
            for file in files:
                with safe_open(file, framework="np") as handle:
                    self.file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.quantized = {name[: -len("_scale_inv")] for name in self.file_of if name.endswith("_scale_inv")}

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            if not file.exists():
                raise ValueError(f"{self.where} names shard {file}, which does not exist")
            self._handles[file] = safe_open(file, framework="np")
        return self._handles[file]

    def _raw(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        handle = self._handle(file)
        if name not in handle.keys():
            raise ValueError(f"tensor {name!r} is listed in {self.where} but missing from {file}")
        if handle.get_slice(name).get_dtype() == "F8_E4M3":
            return self._read_float8(file, name)  # numpy has no float8 type for safetensors to hand back
        return handle.get_tensor(name)

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

    def read(self, name: str, block: Sequence[int]) -> np.ndarray:
        """The tensor `name`, dequantized to float32 if the checkpoint stores `name + "_scale_inv"` beside it."""
        if name in self.quantized:
            return dequantize_fp8_blockwise(self._raw(name), self._raw(name + "_scale_inv"), block)
        return self._raw(name)


def _lookup(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _insert(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flat_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(tree, dict):
        return [prefix]
    return [p for key, value in tree.items() for p in _flat_paths(value, prefix + (key,))]


def _check_names(entries: list[Entry], checkpoint: _Checkpoint, config: Any) -> None:
    """Raise, before reading any tensor, on a missing tensor or on tensors nothing will read."""
    needed = {name for entry in entries for name in entry.names.flat}
    optional = {name for entry in entries if entry.fill is not None for name in entry.names.flat}
    missing = sorted(needed - optional - set(checkpoint.file_of))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from {checkpoint.where}"
                         + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""))
    scales = {name + "_scale_inv" for name in checkpoint.quantized}
    extra = sorted(n for n in checkpoint.file_of if n not in needed and n not in scales and not ignorable(n, config))
    if extra:
        raise ValueError(f"{len(extra)} tensors in {checkpoint.where} have no place in the {config.attention} model "
                         f"built from config.json: {extra[:20]}" + (" ..." if len(extra) > 20 else ""))


def _place(host: np.ndarray, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load_hf(path: str | os.PathLike, dtype: str = "bfloat16", mesh: Optional[jax.sharding.Mesh] = None,
            rules: Optional[Sequence[tuple[str, Any]]] = None) -> tuple["Transformer", dict]:
    """Load a Hugging Face checkpoint directory (DeepSeek-V3/V2, Qwen3/Qwen2, Llama) as `(model, params)`.

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
      dtype: parameter and compute dtype of the model ("bfloat16", "float32"); parameters the model keeps in
        float32 (router, expert bias) stay float32.
      mesh, rules: when a mesh is given, every parameter is created directly on the NamedSharding its logical axis
        names map to under `rules` (flax logical axis rules: `(("embed", "fsdp"), ("mlp", "tensor"), ...)`).
    Returns: `(model, params)` with `model.apply({"params": params}, tokens [batch, seq])` -> logits.
    """
    from jaxopd.model import Transformer

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    if mesh is not None and rules is None:
        raise ValueError("load_hf: mesh given without rules; pass the logical axis rules that map parameter axes "
                         "(embed, mlp, experts, ...) to mesh axes")
    hf_config = json.loads((path / "config.json").read_text())
    dtype = jnp.dtype(dtype).name
    config = config_from_hf(hf_config).replace(dtype=dtype, param_dtype=dtype)
    checkpoint = _Checkpoint(path)
    mtp_prefix = f"model.layers.{config.num_layers}."
    if config.mtp_depth and not any(name.startswith(mtp_prefix) for name in checkpoint.file_of):
        warnings.warn(f"config.json asks for {config.mtp_depth} multi-token-prediction module(s) but no "
                      f"{mtp_prefix}* tensors are stored (transformers drops them); loading without MTP", stacklevel=2)
        config = config.replace(mtp_depth=0)
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size", _FP8_BLOCK)

    model = Transformer(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shardings = None
    if mesh is not None:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = nn.unbox(boxed)
    entries = param_entries(config)
    mapped = sorted(entry.path for entry in entries)
    if mapped != sorted(_flat_paths(abstract)):
        raise RuntimeError(f"jaxopd.hf.mapping is out of date with the model's parameters: mapped {mapped}, "
                           f"model has {sorted(_flat_paths(abstract))}")
    _check_names(entries, checkpoint, config)

    params: dict = {}
    for entry in entries:
        target = _lookup(abstract, entry.path)
        host = np.empty(target.shape, target.dtype)
        for index in np.ndindex(entry.names.shape):
            name = entry.names[index]
            if name not in checkpoint.file_of:
                host[index] = entry.fill
                continue
            host[index] = entry.to_ours(checkpoint.read(name, block), target.shape[len(index):])
        _insert(params, entry.path, _place(host, None if shardings is None else _lookup(shardings, entry.path)))
        del host
    return model, params


class _ShardWriter:
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


def save_hf(model: "Transformer", params: dict, path: str | os.PathLike, max_shard_size: int = 5 * 2**30,
            dtype: Optional[str] = None) -> None:
    """Write `params` of `model` as a Hugging Face checkpoint that `transformers.AutoModelForCausalLM` loads.

    Args:
      model: the `Transformer` whose config picks the architecture (MLA -> deepseek_v3 / deepseek_v2 for softmax
        routing; GQA -> qwen3 with qk-norm, qwen2 with q/k/v bias, else llama).
      params: its parameter tree (plain or boxed arrays, sharded or not; gathered one parameter at a time).
      path: output directory (created).
      max_shard_size: bytes per safetensors file; more than one file adds model.safetensors.index.json.
      dtype: stored dtype ("bfloat16", "float32"); defaults to `model.config.param_dtype`.
    """
    config = model.config
    dtype = jnp.dtype(dtype or config.param_dtype).name
    np_dtype = np.dtype(jnp.dtype(dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2))
    params = nn.unbox(params)
    writer = _ShardWriter(path, max_shard_size)
    copies: dict[str, list[str]] = {}
    for copy, source in shared_copies(config).items():
        copies.setdefault(source, []).append(copy)
    for entry in param_entries(config):
        value = np.asarray(jax.device_get(_lookup(params, entry.path)))
        if entry.fill is not None and np.all(value == entry.fill):
            continue  # a parameter the target architecture lacks, still at its neutral value
        if entry.fill is not None:
            raise ValueError(f"save_hf: {'/'.join(entry.path)} is not {entry.fill} everywhere, but "
                             f"{config_to_hf(config, dtype)['model_type']} has no such tensor")
        if value.dtype == jnp.dtype(config.param_dtype):  # parameters the model keeps in float32 stay float32
            value = value.astype(np_dtype)
        for index in np.ndindex(entry.names.shape):
            tensor = entry.to_hf(value[index])
            for stored_name in [entry.names[index], *copies.get(entry.names[index], [])]:
                writer.add(stored_name, tensor)
    writer.finish()
