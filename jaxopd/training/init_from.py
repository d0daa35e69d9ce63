"""The models a run is given: `config.init_from` (the student's weights) and `distill.teacher`, each a Hugging Face
checkpoint directory or a jaxopd run/checkpoint.

`resolve(config)` runs before anything is built (jaxopd.train calls it): it reads what the checkpoints hold and fills
it into the run config, raising ConfigError for every contradiction at once.

  - model: with init_from.path set, every architecture field (jaxopd.model.config.architecture_fields) comes from the
    checkpoint: a Hugging Face config.json (jaxopd.hf.hf_model_config) or the `model` section of a jaxopd
    checkpoint's saved run config. A field the config sets to another value is an error naming `model.<field>`, the
    config's value and the checkpoint's. The run choices (RUN_CHOICE_FIELDS: dtypes, remat, attention
    implementation, LoRA, ...) are the config's and are never read from or compared with a checkpoint.
  - data.tokenizer, when the config leaves it at its default and the student is a Hugging Face directory: that
    directory (its tokenizer.json and tokenizer_config.json).
  - distill.teacher_tokenizer, when "" and the teacher is a Hugging Face directory: the teacher's directory.

"Set" means: different from the default. For model fields the default is ModelConfig's (a field without one, like
vocab_size, is set whenever it has a value), for the rest base_config()'s — the rule by which a run prints the keys
that differ from the defaults. The model is a ConfigDict holding every field (so the command line can set any), so
its values are the only record of intent: a config that leaves config.model empty, or sets it to
`model_config_dict({})`, sets no architecture field; `load_model_preset(name)` sets every field its preset gives a
non-default value; `--config.model.rope_theta=...` sets that one. Setting a field to its default value is the same
as not setting it, and the checkpoint's value is used: the weights fix the architecture either way.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any, Literal

import jax
import ml_collections

from jaxopd.bundled import resolve_path
from jaxopd.data.pipeline import DataConfig
from jaxopd.model import lora
from jaxopd.model.config import ModelConfig, architecture_fields
from jaxopd.training import checkpoint, sharding
from jaxopd.training.config import (PRETRAINING_LOSSES, ConfigError, InitFromConfig, model_config_dict,
                                    to_model_config)
from jaxopd.training.state import Run

SourceKind = Literal["hf", "checkpoint"]


def source_kind(path: str | pathlib.Path, kind: str = "auto") -> SourceKind:
    """"hf" for a Hugging Face checkpoint directory (config.json with a model_type), "checkpoint" for a jaxopd run
    workdir or checkpoint directory; `kind` "auto" detects it, "hf"/"checkpoint" must agree. ValueError for a path
    that does not exist or is not the kind asked for."""
    from jaxopd.hf import is_hf_checkpoint

    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a jaxopd run/checkpoint directory or a Hugging Face "
                         "checkpoint directory")
    found: SourceKind = "hf" if is_hf_checkpoint(path) else "checkpoint"
    if kind not in ("auto", found):
        what = {"hf": "a Hugging Face checkpoint directory (config.json with a model_type)",
                "checkpoint": "a jaxopd run/checkpoint directory"}
        raise ValueError(f"{path} is {what[found]}, not {what[kind]}; set init_from.kind={found!r} or 'auto'")
    return found


def checkpoint_model_config(path: str | pathlib.Path, kind: SourceKind) -> ModelConfig:
    """The ModelConfig of the model stored at `path` (its architecture fields are the checkpoint's; for a jaxopd
    checkpoint the run choices are those it was saved with, for a Hugging Face one the defaults)."""
    if kind == "hf":
        from jaxopd.hf import hf_model_config

        return hf_model_config(path, dtype="float32")  # the dtype is the run's choice, not read
    return to_model_config(model_config_dict(checkpoint.read_model_fields(path)[1]))


def _model_values(fields: dict[str, Any]) -> dict[str, Any]:
    """A model section as plain values (rope_scaling a dict), the form in which config and checkpoint compare."""
    return model_config_dict(fields).to_dict()


def _resolve_model(config: ml_collections.ConfigDict, path: str, problems: list[str]) -> None:
    """config.model with the architecture of the checkpoint at init_from.path (see the module docstring)."""
    try:
        kind = source_kind(path, config.init_from.kind)
        given = checkpoint_model_config(path, kind)
    except ValueError as error:
        problems.append(f"init_from.path={config.init_from.path}: {error}")
        return
    ours = config.model.to_dict()
    defaults = _model_values({})
    theirs = _model_values({name: getattr(given, name) for name in architecture_fields()})
    for name in architecture_fields():
        if name in ours and ours[name] != defaults[name] and ours[name] != theirs[name]:
            problems.append(f"model.{name}={ours[name]!r} contradicts the checkpoint {path}, which has "
                            f"{name}={theirs[name]!r}: the architecture comes from init_from.path; drop the setting")
    run_choices = {name: value for name, value in ours.items() if name not in architecture_fields()}
    config.model = model_config_dict({**run_choices, **{name: theirs[name] for name in architecture_fields()}})
    if kind == "hf" and config.data.tokenizer == DataConfig.tokenizer:
        config.data.tokenizer = _tokenizer_directory(path, "init_from.path", "data.tokenizer", problems)


def _tokenizer_directory(path: str, key: str, tokenizer_key: str, problems: list[str]) -> str:
    """`path` when the Hugging Face directory holds its tokenizer (tokenizer.json), else a problem naming the file."""
    if not (pathlib.Path(path) / "tokenizer.json").is_file():
        problems.append(f"{key}={path} has no tokenizer.json, and {tokenizer_key} is not set: copy the model's "
                        f"tokenizer files (tokenizer.json, tokenizer_config.json) into {path}, or set {tokenizer_key}")
    return path


def _resolve_teacher(section: ml_collections.ConfigDict, key: str, problems: list[str]) -> None:
    """A teacher (`section.teacher`, `key` its config key prefix: "distill" or "distill.sets.<name>") checked up
    front (it exists; a Hugging Face one is an architecture jaxopd supports) and its tokenizer: a Hugging Face
    teacher's own directory when `section.teacher_tokenizer` is ""."""
    path = resolve_path(section.teacher)
    try:
        if source_kind(path) != "hf":
            return
        checkpoint_model_config(path, "hf")
    except ValueError as error:
        problems.append(f"{key}.teacher={section.teacher}: {error}")
        return
    if not section.teacher_tokenizer:
        section.teacher_tokenizer = _tokenizer_directory(path, f"{key}.teacher", f"{key}.teacher_tokenizer", problems)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the run config with what its checkpoints hold filled in (module docstring); ConfigError listing
    every contradiction and every unreadable or unsupported checkpoint, before anything is built."""
    config = copy.deepcopy(config)
    problems: list[str] = []
    with config.unlocked():
        if config.init_from.path:
            _resolve_model(config, resolve_path(config.init_from.path), problems)
        if config.loss not in PRETRAINING_LOSSES:
            if config.distill.teacher:
                _resolve_teacher(config.distill, "distill", problems)
            for name, prompt_set in config.distill.sets.items():
                if prompt_set.teacher:
                    _resolve_teacher(prompt_set, f"distill.sets.{name}", problems)
    if problems:
        raise ConfigError(problems)
    return config


def load_initial_params(source: InitFromConfig, run: Run, param_dtype: str) -> Any:
    """The params `config.init_from` names, in the run's shardings and `param_dtype`: a jaxopd run's checkpoint, or a
    Hugging Face checkpoint (read straight into its shards). None when init_from.path is empty. The run's model must
    be the checkpoint's (`resolve` makes it so); ValueError naming the first param that differs otherwise. A LoRA
    run's adapters are not in its base checkpoint: they keep their initialization (B = 0, so the run starts at the
    base model)."""
    if not source.path:
        return None
    path = resolve_path(source.path)  # the bundled checkpoints are found from any working directory
    abstract = sharding.abstract_arrays(run.state["params"], run.shardings["params"])
    adapters, base = lora.split(run.state["params"])[0], lora.split(abstract)[1]
    if source_kind(path, source.kind) == "checkpoint":
        return lora.combine(adapters, checkpoint.load_params(path, base))
    from jaxopd.hf import load_hf  # the optional Hugging Face import path, only needed here

    _, loaded = load_hf(path, dtype=param_dtype, mesh=run.mesh, rules=sharding.LOGICAL_AXIS_RULES,
                        scan_layers=run.model.config.scan_layers)
    shapes = [{jax.tree_util.keystr(key): leaf.shape for key, leaf in jax.tree_util.tree_leaves_with_path(tree)}
              for tree in (base, loaded)]
    if shapes[0] != shapes[1]:
        first = sorted(key for key in shapes[0].keys() | shapes[1].keys()
                       if shapes[0].get(key) != shapes[1].get(key))[0]
        raise ValueError(f"init_from.path={source.path}: param {first} is {shapes[1].get(first)} in the checkpoint "
                         f"but {shapes[0].get(first)} in config.model; the architecture must be the checkpoint's "
                         "(jaxopd.train reads it from there)")
    base_shardings = lora.split(run.shardings["params"])[1]
    placed = jax.device_put(jax.tree.map(lambda new, leaf: new.astype(leaf.dtype), loaded, base), base_shardings)
    return lora.combine(adapters, placed)
