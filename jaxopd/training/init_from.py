"""The models a run is given: `config.init_from` (the student's weights) and `distill.teacher`, each a Hugging Face
checkpoint directory or a jaxopd run/checkpoint.

`resolve(config)` runs before anything is built (jaxopd.train calls it): it reads what the checkpoints hold and fills
it into the run config, raising ConfigError for every contradiction at once.

  - model: with init_from.path set, every architecture field (jaxopd.model.config.architecture_fields) comes from the
    checkpoint: a Hugging Face config.json (jaxopd.hf.hf_model_config) or the `model` section of a jaxopd
    checkpoint's saved run config. A field the config sets to another value is an error naming `model.<field>`, the
    config's value and the checkpoint's, but for the context-extension fields (CONTEXT_EXTENSION_FIELDS:
    rope_scaling, max_position_embeddings), which a later stage sets to extend the window (DeepSeek-V3 §4.3: YaRN
    from 4K to 32K and 128K): the config's value, when set, is used. The run choices (RUN_CHOICE_FIELDS: dtypes, remat, attention
    implementation, LoRA, ...) are the config's and are never read from or compared with a checkpoint.
  - data.tokenizer, when the config leaves it at its default and the student is a Hugging Face directory: that
    directory (its tokenizer.json and tokenizer_config.json).
  - distill.teacher_tokenizer, when "" and the teacher is a Hugging Face directory: the teacher's directory.
  - init_from.optimizer="carry" needs a jaxopd checkpoint holding an optimizer state of the same params (not a
    Hugging Face one, nor a LoRA run on either side); `initial_state` then takes its AdamW moments too.

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
import jax.numpy as jnp
import ml_collections
import optax

from jaxopd.bundled import resolve_path
from jaxopd.data.pipeline import DataConfig
from jaxopd.model import lora
from jaxopd.model.config import CONTEXT_EXTENSION_FIELDS, ModelConfig, architecture_fields
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
    chosen = {name: value for name, value in ours.items() if name not in architecture_fields()}  # the run choices
    for name in architecture_fields():
        is_set = name in ours and ours[name] != defaults[name]
        if is_set and name in CONTEXT_EXTENSION_FIELDS:
            chosen[name] = ours[name]  # a context-extension stage: the new window replaces the checkpoint's
        elif is_set and ours[name] != theirs[name]:
            problems.append(f"model.{name}={ours[name]!r} contradicts the checkpoint {path}, which has "
                            f"{name}={theirs[name]!r}: the architecture comes from init_from.path; drop the setting")
    config.model = model_config_dict({**{name: theirs[name] for name in architecture_fields()}, **chosen})
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


def _check_carry(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """init_from.optimizer="carry": init_from.path must be a jaxopd checkpoint whose optimizer state covers the same
    params as this run's (neither side LoRA, whose optimizer holds only its adapters)."""
    fix = "or set init_from.optimizer='restart' for fresh AdamW moments"
    if not config.init_from.path:
        problems.append(f"init_from.optimizer='carry' needs init_from.path (a jaxopd run to carry the optimizer "
                        f"state from); set it, {fix}")
        return
    path = resolve_path(config.init_from.path)
    try:
        if source_kind(path, config.init_from.kind) == "hf":
            problems.append(f"init_from.optimizer='carry': init_from.path={config.init_from.path} is a Hugging Face "
                            f"checkpoint, which holds no optimizer state; {fix}")
            return
        saved = checkpoint.read_model_fields(path)[1]
    except ValueError:
        return  # _resolve_model names the unreadable path
    if not checkpoint.has_train_state(path):
        problems.append(f"init_from.optimizer='carry': {config.init_from.path} holds params only (written by "
                        f"save_model), no optimizer state; give the workdir of the run that trained it, {fix}")
    for where, rank in (("this run", config.model.get("lora_rank") or 0),
                        (f"the checkpoint {config.init_from.path}", saved.get("lora_rank") or 0)):
        if rank:
            problems.append(f"init_from.optimizer='carry': {where} trains LoRA adapters (lora_rank={rank}), so the "
                            f"two optimizer states hold different params; {fix}")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the run config with what its checkpoints hold filled in (module docstring); ConfigError listing
    every contradiction and every unreadable or unsupported checkpoint, before anything is built."""
    config = copy.deepcopy(config)
    problems: list[str] = []
    with config.unlocked():
        if config.init_from.path:
            _resolve_model(config, resolve_path(config.init_from.path), problems)
        if config.init_from.optimizer == "carry":
            _check_carry(config, problems)
        if config.loss not in PRETRAINING_LOSSES:
            if config.distill.teacher:
                _resolve_teacher(config.distill, "distill", problems)
            for name, prompt_set in config.distill.sets.items():
                if prompt_set.teacher:
                    _resolve_teacher(prompt_set, f"distill.sets.{name}", problems)
    if problems:
        raise ConfigError(problems)
    return config


def initial_state(source: InitFromConfig, run: Run, param_dtype: str) -> dict[str, Any]:
    """The state a run starts from when it has no checkpoint of its own: `run.state` (fresh) with the params
    `init_from` names (load_initial_params) and, with init_from.optimizer="carry", the optimizer state of that
    checkpoint's newest step (AdamW's moments and step count; the learning-rate schedule's own count is set to 0,
    so the schedule follows this run's step as its logged learning_rate does). `resolve` checked the pairing."""
    params = load_initial_params(source, run, param_dtype)
    if params is None:
        return run.state
    state = {**run.state, "params": params}
    if source.optimizer == "carry":
        train = [key for key in run.state if key != "params"]
        abstract = sharding.abstract_arrays({key: run.state[key] for key in train},
                                            {key: run.shardings[key] for key in train})
        abstract_params = sharding.abstract_arrays(run.state["params"], run.shardings["params"])
        state["opt_state"] = _restart_schedule(
            checkpoint.load_opt_state(resolve_path(source.path), abstract, abstract_params))
    return state


def _restart_schedule(opt_state: Any) -> Any:
    """`opt_state` with the step count of every learning-rate schedule (optax.ScaleByScheduleState) at 0."""
    def restart(leaf: Any) -> Any:
        if not isinstance(leaf, optax.ScaleByScheduleState):
            return leaf
        return leaf._replace(count=jax.device_put(jnp.zeros_like(leaf.count), leaf.count.sharding))
    return jax.tree.map(restart, opt_state, is_leaf=lambda leaf: isinstance(leaf, optax.ScaleByScheduleState))


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
