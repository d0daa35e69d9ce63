"""Hugging Face checkpoints in and out: `load_hf(path) -> (model, params)` and `save_hf(model, params, path)`.

Loading reads `config.json`, translates it (`jaxopd.hf.config`), then fills the model's parameters one at a time:
each of our parameters is built in one preallocated host buffer from its Hugging Face tensors (per-expert tensors are
written straight into their slice of the stacked `[experts, ...]` buffer), placed on its sharding, and dropped from the
host before the next one is read — so the host never holds the model twice (scanned layers, `ModelConfig.scan_layers`:
one parameter's stack of layers at a time). DeepSeek's block-wise fp8 weights are
dequantized on the way (`jaxopd.hf.fp8`). Which tensor goes where is `jaxopd.hf.mapping`.

Saving writes `config.json` and safetensors shards (with `model.safetensors.index.json` when there is more than one)
in the layout transformers' `AutoModelForCausalLM.from_pretrained` reads, per-expert tensors included. The files
themselves are read and written by `jaxopd.hf.safetensors_io`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.hf.config import config_from_hf, config_to_hf
from jaxopd.hf.fp8 import FP8_BLOCK
from jaxopd.hf.mapping import Entry, ignorable, param_entries, shared_copies
from jaxopd.hf.safetensors_io import SafetensorsReader, ShardWriter, read_json
from jaxopd.model.config import ModelConfig

if TYPE_CHECKING:
    from jaxopd.model import Transformer


def _lookup(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _insert(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _unboxed(tree: Any) -> Any:
    """`tree` without its flax partitioning boxes, as stored (nn.unbox would add sharding constraints whenever a
    mesh is set with jax.set_mesh, which arrays placed by hand or shape structs do not take)."""
    return jax.tree.map(lambda leaf: leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf, tree,
                        is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))


def _flat_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(tree, dict):
        return [prefix]
    return [p for key, value in tree.items() for p in _flat_paths(value, prefix + (key,))]


def _check_names(entries: list[Entry], checkpoint: SafetensorsReader, config: Any) -> None:
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


# The files of a Hugging Face checkpoint directory that describe its tokenizer (each one optional).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")
# safetensors dtype tags -> the dtype a checkpoint is loaded in; DeepSeek's block-wise fp8 weights come with bfloat16
# (their non-quantized tensors' dtype).
_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "bfloat16"}


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a Hugging Face checkpoint directory: its config.json names a `model_type` (a jaxopd run
    workdir's config.json is the run config and has none), or it holds safetensors files beside a config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    return "model_type" in read_json(path / "config.json") or any(path.glob("*.safetensors"))


def copy_tokenizer_files(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copies the tokenizer at `source` into the checkpoint directory `out`: a directory's TOKENIZER_FILES, or a
    tokenizer file (as tokenizer.json, or tokenizer.model for a sentencepiece .model) with the tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja beside it. Returns the names written."""
    source, out = Path(source), Path(out)
    if source.is_dir():
        copies = {name: source / name for name in TOKENIZER_FILES}
    else:
        copies = {name: source.parent / name for name in TOKENIZER_FILES[1:4]}
        copies["tokenizer.model" if source.suffix == ".model" else "tokenizer.json"] = source
    written = []
    for name, file in copies.items():
        if file.is_file():
            shutil.copyfile(file, out / name)
            written.append(name)
    return sorted(written)


def checkpoint_dtype(hf_config: dict, checkpoint: SafetensorsReader, where: Path) -> str:
    """The dtype a checkpoint holds its weights in: config.json's `dtype` (transformers 5) or `torch_dtype` (older),
    else the stored dtype of its embedding (or first) tensor."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if name is not None:
        name = str(name).removeprefix("torch.")
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{where / 'config.json'}: dtype={name!r} is not float32, bfloat16 or float16; pass "
                             "load_hf(..., dtype=...)")
        return name
    embedding = "model.embed_tokens.weight"
    tensor = embedding if embedding in checkpoint.file_of else min(checkpoint.file_of)
    tag = checkpoint.stored_dtype(tensor)
    if tag not in _STORED_DTYPES:
        raise ValueError(f"{checkpoint.where}: tensor {tensor!r} is stored as {tag}, not a floating dtype jaxopd "
                         "loads; pass load_hf(..., dtype=...)")
    return _STORED_DTYPES[tag]


def _read(path: Path, dtype: Optional[str], scan_layers: Optional[bool] = None
          ) -> tuple[dict, SafetensorsReader, ModelConfig]:
    """(config.json, its tensors, the ModelConfig load_hf builds from them in `dtype`, None = the checkpoint's, with
    `scan_layers`, None = ModelConfig's default)."""
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    hf_config = read_json(path / "config.json")
    config = config_from_hf(hf_config)
    checkpoint = SafetensorsReader(path)
    dtype = jnp.dtype(dtype or checkpoint_dtype(hf_config, checkpoint, path)).name
    config = config.replace(dtype=dtype, param_dtype=dtype)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    mtp_prefix = f"model.layers.{config.num_layers}."
    if config.mtp_depth and not any(name.startswith(mtp_prefix) for name in checkpoint.file_of):
        warnings.warn(f"config.json asks for {config.mtp_depth} multi-token-prediction module(s) but no "
                      f"{mtp_prefix}* tensors are stored (transformers drops them); loading without MTP", stacklevel=3)
        config = config.replace(mtp_depth=0)
    return hf_config, checkpoint, config


def hf_model_config(path: str | os.PathLike, dtype: Optional[str] = None) -> ModelConfig:
    """The ModelConfig `load_hf(path, dtype)` builds (MTP modules only when their tensors are stored), read from
    config.json and the tensors' headers alone; ValueError naming the field for what jaxopd does not support."""
    return _read(Path(path), dtype)[2]


def load_hf(path: str | os.PathLike, dtype: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
            rules: Optional[Sequence[tuple[str, Any]]] = None, scan_layers: Optional[bool] = None
            ) -> tuple["Transformer", dict]:
    """Load a Hugging Face checkpoint directory (DeepSeek-V3/V2, Qwen3/Qwen2, Llama) as `(model, params)`.

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
      dtype: parameter and compute dtype of the model ("bfloat16", "float32"); None: the checkpoint's own
        (`checkpoint_dtype`). Parameters the model keeps in float32 (router, expert bias) stay float32.
      mesh, rules: when a mesh is given, every parameter is created directly on the NamedSharding its logical axis
        names map to under `rules` (flax logical axis rules: `(("embed", "fsdp"), ("mlp", "tensor"), ...)`).
      scan_layers: the model's `ModelConfig.scan_layers` (None: its default); scanned, each stacked parameter is
        filled layer by layer from the per-layer tensors.
    Returns: `(model, params)` with `model.apply({"params": params}, tokens [batch, seq])` -> logits.
    """
    from jaxopd.model import Transformer

    path = Path(path)
    if mesh is not None and rules is None:
        raise ValueError("load_hf: mesh given without rules; pass the logical axis rules that map parameter axes "
                         "(embed, mlp, experts, ...) to mesh axes")
    hf_config, checkpoint, config = _read(path, dtype, scan_layers)
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size", FP8_BLOCK)

    model = Transformer(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shardings = None
    if mesh is not None:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = _unboxed(boxed)
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
    params = _unboxed(params)
    writer = ShardWriter(path, max_shard_size)
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
