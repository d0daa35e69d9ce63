"""Run configuration helpers: ml_collections files, model presets, locked overrides, the saved resolved config.

A run config is a `get_config()` file in `configs/` returning a `ConfigDict` (see configs/tiny_pretrain.py for every
key). Overrides come from the command line as `--config.a.b=v` (absl + `config_flags`, as in the Flax examples); the
config is locked, so a misspelt key fails with the close valid keys listed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import pathlib
import typing
from typing import Any, Iterable, Optional

import ml_collections
from ml_collections import config_dict

from jaxopd.model import load_preset
from jaxopd.model.config import ModelConfig, RopeScaling

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted key paths of a config, nested ones included (`optimizer.schedule.peak_lr`)."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, prefix=f"{path}."))
    return keys


def check_override_keys(config: ml_collections.ConfigDict, argv: Iterable[str], flag_name: str = "config") -> None:
    """Raises ValueError for a `--config.key=...` argument whose key is not in the config, listing close valid keys.

    ml_collections would also refuse the key (the config is locked); this check runs first to say it in one line.
    """
    valid = flat_keys(config)
    prefix = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key = arg[len(prefix):].split("=", 1)[0]
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see the config file for the valid keys."
            raise ValueError(f"unknown config key {key!r} in {arg!r}: {hint}")


def load_config_file(path: str | pathlib.Path, overrides: Optional[dict[str, Any]] = None) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, applies {"a.b": value} overrides and locks the result.

    The programmatic twin of `--config=path --config.a.b=v` for tests and notebooks.
    """
    config = _load_module(pathlib.Path(path)).get_config()
    config.lock()
    overrides = overrides or {}
    check_override_keys(config, [f"--config.{key}=" for key in overrides])
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def load_model_preset(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The model preset `models/<name>.py` (jaxopd.model.load_preset) as a ConfigDict with every `ModelConfig` field,
    so the command line can override any of them (`--config.model.num_layers=2`)."""
    fields = dataclasses.asdict(load_preset(name))
    fields.update(overrides)
    return model_config_dict(fields)


def model_config_dict(fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """A ConfigDict holding every ModelConfig field, optional ones as typed placeholders so the CLI can set them."""
    hints = typing.get_type_hints(ModelConfig)
    unknown = set(fields) - set(hints)
    if unknown:
        raise ValueError(f"model preset has fields {sorted(unknown)} that ModelConfig does not have")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    result = ml_collections.ConfigDict()
    for name, hint in hints.items():
        value = fields.get(name, defaults[name])
        if name == "rope_scaling":
            result[name] = _rope_scaling_dict(value)
        elif value is None or value is dataclasses.MISSING:
            result[name] = config_dict.placeholder(_optional_type(hint))
        else:
            result[name] = value
    return result


def to_model_config(model: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig described by a run config's `model` section."""
    fields = model.to_dict()
    missing = [f.name for f in dataclasses.fields(ModelConfig)
               if f.default is dataclasses.MISSING and fields.get(f.name) is None]
    if missing:
        raise ValueError(f"config.model is missing required fields {missing}; set them in the preset or as overrides")
    scaling = fields.pop("rope_scaling", None)
    if scaling is not None and scaling.get("kind") is None:
        scaling = None
    return ModelConfig(**fields, rope_scaling=RopeScaling(**scaling) if scaling is not None else None)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (what is printed at start and saved as workdir/config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config))
    return path


def _rope_scaling_dict(value: Any) -> ml_collections.ConfigDict:
    """RopeScaling fields, with `kind` None meaning "no scaling" so every field stays overridable."""
    if isinstance(value, RopeScaling):
        value = dataclasses.asdict(value)
    defaults = dataclasses.asdict(RopeScaling(kind=""))
    defaults.update(value or {})
    result = ml_collections.ConfigDict(defaults)
    if value is None:
        result.kind = config_dict.placeholder(str)
    return result


def _optional_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _load_module(path: pathlib.Path) -> Any:
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_jaxopd_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_config() -> ml_collections.ConfigDict:
    """Every run-config key with its default; configs/*.py start from this and set `model` (a preset) and sizes."""
    from jaxopd.data.pipeline import default_data_config

    config = ml_collections.ConfigDict()
    config.workdir = "workdirs/run"
    config.steps = 1000
    config.seed = 0
    config.batch_size = 8  # global sequences per optimizer step (the final size when batch_ramp is on)
    config.microbatch_size = 8  # sequences per forward/backward; batch_size / microbatch_size accumulation steps
    config.seq_len = 128
    config.log_every = 10
    config.eval_every = 100  # 0: no eval; the eval pass is data.eval_batches microbatches of split "eval"
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.progress_bar = True
    config.unigram_entropy_batches = 0  # >0: log the unigram entropy of that many training microbatches at start
    config.data_shards = 0  # data pipelines per run (0: one per process); fix it to keep data order across host counts
    config.model = ml_collections.ConfigDict()  # set by the config file: load_model_preset(name, **overrides)
    config.data = default_data_config()
    # Objective: "ce" (next-token cross-entropy); the distillation losses register more (jaxopd/train_step.py).
    config.loss = "ce"
    config.loss_chunk_size = 512  # sequence positions per chunk of the chunked CE (bounds the [rows, chunk, vocab])
    config.z_loss_weight = 0.0
    config.mtp_weight = 0.3  # DeepSeek-V3 §4.2: lambda = 0.3 for the first 10T tokens, 0.1 after
    config.moe_balance_weight = 1e-4  # sequence-wise balance loss alpha (DeepSeek-V3 §4.2)
    config.moe_bias_rate = 1e-3  # aux-loss-free bias update speed gamma (DeepSeek-V3 §4.2)
    config.skip_nonfinite_steps = False  # True: a NaN/Inf step leaves the state unchanged; False: stop the run
    config.optimizer = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
        schedule=dict(kind="warmup_cosine", peak_lr=3e-4, warmup_steps=100, decay_start=100, decay_end=1000,
                      end_lr=3e-5, final_step=-1, final_lr=0.0)))
    config.batch_ramp = ml_collections.ConfigDict(dict(start=0, tokens=0.0))  # start=0: constant batch_size
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1, auto_detect=False))
    config.init_from = ml_collections.ConfigDict(dict(kind="checkpoint", path=""))  # "checkpoint" | "hf"
    return config
