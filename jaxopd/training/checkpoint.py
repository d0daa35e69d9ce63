"""Checkpoints with orbax: params, optimizer state + step + RNG, the data iterator's state and the config.

One step directory holds four items: `params` and `train` (opt_state, step, rng) as sharded arrays,
`data` (each process's iterator `get_state()` as process_<i>-of-<n>.json) and `config` (the resolved config).
A run resumes on the process count that wrote its checkpoint, unless its data state is the same on every process
(`same_data_state_on_every_process`, as distillation's global prompt position), which any count reads.
Saves are asynchronous and atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when every
item is committed), so an interrupted save never looks like a checkpoint.

Restoring tells two failures apart, newest step first:
- *incompatible*: the config saved with the checkpoint differs from the run's in a key that resuming needs (anything
  but MAY_CHANGE_ON_RESUME), or its arrays have other shapes or dtypes than the run's state. It raises
  IncompatibleCheckpointError (a ValueError) naming each difference and the ways forward, before anything is written,
  moved or deleted, so a changed config never restarts at step 0 and lets rotation delete the old run's checkpoints.
- *damaged*: an item does not read (a truncated or missing file, a partial copy). The step directory is moved aside to
  `<step>.damaged-<UTC time>` (a name orbax does not take for a step, so that step can be saved again), reported in
  one line, and the previous step is tried; with no step left the run starts afresh.
Nothing is deleted but by the rotation (`keep`) of the run's own checkpoints.

Layer layouts: params (and the param-shaped optimizer moments) are saved as the run holds them, unrolled
(`layers_{i}`) or scanned (stacked, `ModelConfig.scan_layers`). Restoring reads a checkpoint in the layout it was
saved in (told by its arrays, so checkpoints from before scan_layers existed read as unrolled) and converts to the
run's, one parameter at a time (`jaxopd.model.stacking`): a run may resume, fine-tune from or export any jaxopd
checkpoint with either `model.scan_layers`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxopd.model.config import FORWARD_PASS_FIELDS, ModelConfig
from jaxopd.model.stacking import is_scanned, to_layout
from jaxopd.training.config import flat_values, model_config_dict, to_model_config

# Run-config keys (dotted, as in the ConfigDict; a trailing "." covers a whole section) that may differ between a
# checkpoint and the run resuming it: how long, how often, where and on what devices the run computes, not what it
# computes. Every other key must match, new keys included (a key the saved config lacks, from an older jaxopd, is not
# compared). The learning-rate schedule may change (to extend a run: raise steps and decay_end); the optimizer's own
# constants, the loss and its weights, the model, the sizes, the seed and the data may not.
MAY_CHANGE_ON_RESUME = (
    "workdir", "steps", "log_every", "eval_every", "progress_bar", "unigram_entropy_batches",
    "checkpoint_every", "keep_checkpoints", "async_checkpoints", "skip_nonfinite_steps", "loss_chunk_size",
    "optimizer.schedule.", "mesh.", "distributed.", "init_from.", "data.eval_batches",
    "distill.eval_prompts", "distill.eval_prompts_count", "export_hf",
    # how rollouts are batched, never which tokens are drawn (each row draws from its own key)
    "distill.sampling_microbatch", "distill.scoring_microbatch", "distill.decode_slots",
    # how tokens are drawn, not from which distribution (the main model's either way; the draws differ)
    "distill.speculative",
    # how the forward pass runs, not the architecture (jaxopd/model/config.py)
    *(f"model.{name}" for name in FORWARD_PASS_FIELDS),
)


class IncompatibleCheckpointError(ValueError):
    """The newest checkpoint was written by a run this config cannot resume."""


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} of the keys that differ and must match to resume."""
    # The saved side went through JSON: compare the current one as JSON stores it (a tuple, lora_targets, is a list).
    saved, current = flat_values(saved), flat_values(json.loads(json.dumps(current)))
    return {key: (saved[key], current[key]) for key in sorted(saved.keys() & current.keys())
            if saved[key] != current[key]
            and not any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in MAY_CHANGE_ON_RESUME)}


def _spec(leaf: Any) -> Optional[tuple]:
    """The partition spec of `leaf`'s NamedSharding padded to its rank, or None for any other sharding."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    return tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))


def _resharded(leaf: Any, spec: tuple) -> Any:
    """`leaf`'s sharding with partition spec `spec` (its own sharding when it is not a NamedSharding)."""
    return leaf.sharding if _spec(leaf) is None else NamedSharding(leaf.sharding.mesh, PartitionSpec(*spec))


def _stacked_sharding(leaf: Any) -> Any:
    return leaf.sharding if _spec(leaf) is None else _resharded(leaf, (None, *_spec(leaf)))  # "layers" -> None


def _sliced_sharding(leaf: Any) -> Any:
    return leaf.sharding if _spec(leaf) is None else _resharded(leaf, _spec(leaf)[1:])


# How `to_layout` stacks and slices shape structs (the layout a checkpoint is read in) and arrays (read).
_ABSTRACT = dict(
    stack=lambda leaves: jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype,
                                              sharding=_stacked_sharding(leaves[0])),
    take=lambda leaf, i: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_sliced_sharding(leaf)))
_ARRAYS = dict(
    stack=lambda leaves: jax.jit(lambda *layers: jnp.stack(layers), out_shardings=_stacked_sharding(leaves[0]))(
        *leaves),
    take=lambda leaf, i: jax.jit(lambda stacked, index: jax.lax.dynamic_index_in_dim(stacked, index, keepdims=False),
                                 out_shardings=_sliced_sharding(leaf))(leaf, i))


def _layouts(model_fields: dict[str, Any], saved_params: Any, abstract_params: Any) -> Optional[tuple]:
    """(model config, whether the checkpoint is scanned, whether the run is) when the two layouts differ, else None;
    `saved_params` is the checkpoint's params metadata tree."""
    unrolled = lambda tree: any(key.startswith("layers_") for key in tree)  # the unrolled layout's layer keys
    if unrolled(saved_params) == unrolled(abstract_params):
        return None
    config = to_model_config(model_config_dict(model_fields))
    return config, is_scanned(config, saved_params), is_scanned(config, abstract_params)


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf, tree)


def _read_in_saved_layout(layouts: Optional[tuple], abstract: Any, read: Any) -> Any:
    """`read(abstract in the checkpoint's layout)`, converted to the run's layout (`layouts` from `_layouts`)."""
    if layouts is None:
        return read(abstract)
    config, saved, wanted = layouts
    restored = read(to_layout(config, _copy(abstract), saved, **_ABSTRACT))
    return to_layout(config, restored, wanted, **_ARRAYS)


class Checkpointer:
    """Saves every `every` steps keeping the newest `keep`; restores the newest checkpoint that restores cleanly."""

    def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int, async_save: bool = True,
                 same_data_state_on_every_process: bool = False):
        self.every = every
        self._process_count = jax.process_count()
        self._data_file = f"process_{jax.process_index()}-of-{self._process_count}.json"
        self._same_data_state = same_data_state_on_every_process
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            # primary_host=None: every process writes its own data-iterator state.
            "data": ocp.JsonCheckpointHandler(
                self._data_file, multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
            "config": ocp.JsonCheckpointHandler(),
        }
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                             item_handlers=handlers)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any], data_state: Any, config: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` ({"params", "opt_state", "step", "rng"}) at `step`."""
        train = {key: value for key, value in state.items() if key != "params"}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)), force=True)

    def restore_latest(self, abstract_state: dict[str, Any], config: dict[str, Any]
                       ) -> Optional[tuple[dict[str, Any], Any]]:
        """(state, data_state) of the newest checkpoint that restores, or None when there is none.

        `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct with .sharding) so arrays are
        read straight into their shards; `config` is the run's (the dict `save` is given). Raises
        IncompatibleCheckpointError, having changed nothing, when a checkpoint is not this run's; damaged ones are
        moved aside (see the module docstring).
        """
        damaged: list[tuple[int, str]] = []
        restored = self._newest_restorable(abstract_state, config, damaged)
        if damaged:
            self._set_aside(damaged)
        return restored

    def _newest_restorable(self, abstract_state: dict[str, Any], config: dict[str, Any],
                           damaged: list[tuple[int, str]]) -> Optional[tuple[dict[str, Any], Any]]:
        abstract_train = {key: value for key, value in abstract_state.items() if key != "params"}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
                metadata = self.manager.item_metadata(step)
                saved_arrays = {name: ocp.tree.to_flat_dict(metadata[name].tree, sep="/") for name in ("params", "train")}
            except Exception as error:  # an unreadable config or array metadata: damaged
                damaged.append((step, _reason(error)))
                continue
            abstract = {"params": abstract_state["params"], "train": abstract_train}
            layouts = _layouts(saved["model"], metadata["params"].tree, abstract["params"])
            if layouts is not None:  # compare with, and read into, the checkpoint's own layout
                abstract_saved = to_layout(layouts[0], _copy(abstract), layouts[1], **_ABSTRACT)
            self._check_compatible(step, saved, config, saved_arrays, abstract if layouts is None else abstract_saved)
            data_file = self._data_file_to_read(step)

            def read(abstract: dict[str, Any]) -> dict[str, Any]:
                items = dict(params=ocp.args.StandardRestore(abstract["params"]),
                             train=ocp.args.StandardRestore(abstract["train"]))
                if data_file == self._data_file:
                    return dict(self.manager.restore(step, args=ocp.args.Composite(
                        **items, data=ocp.args.JsonRestore())))
                # written by another process count: the state every process saved alike
                restored = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
                restored["data"] = json.loads((self._step_path(step) / "data" / data_file).read_text())
                return restored

            try:
                restored = _read_in_saved_layout(layouts, abstract, read)
            except Exception as error:  # any read error of a compatible checkpoint: damaged
                damaged.append((step, _reason(error)))
                continue
            return {"params": restored["params"], **restored["train"]}, restored["data"]
        return None

    def _check_compatible(self, step: int, saved_config: dict[str, Any], config: dict[str, Any],
                          saved_arrays: dict[str, dict[str, Any]], abstract: dict[str, Any]) -> None:
        """Raises IncompatibleCheckpointError listing the config keys and arrays that differ."""
        lines = [f"{key}: {saved!r} in the checkpoint, {current!r} now"
                 for key, (saved, current) in resume_differences(saved_config, config).items()]
        for name, tree in abstract.items():
            wanted = {key: (tuple(leaf.shape), str(leaf.dtype)) for key, leaf in
                      ocp.tree.to_flat_dict(tree, sep="/").items()}
            found = {key: (tuple(leaf.shape), str(leaf.dtype)) for key, leaf in saved_arrays[name].items()}
            lines += [f"{name} array {key}: {found.get(key, 'absent')} in the checkpoint, {wanted.get(key, 'absent')} "
                      "now" for key in sorted(wanted.keys() | found.keys()) if wanted.get(key) != found.get(key)]
        if lines:
            shown = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
            raise IncompatibleCheckpointError(
                f"the newest checkpoint in {self.manager.directory} (step {step}) was written by a run this config "
                "cannot resume; these differ:\n" + "\n".join(f"  - {line}" for line in shown) +
                "\nNothing was changed. Either rerun with the config the checkpoint was saved with (its config.json), "
                f"or keep these changes in a new --config.workdir, starting from these weights with "
                f"--config.init_from.path={self.manager.directory} if you want them.")

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Moves each damaged step directory to `<step>.damaged-<UTC time>` (process 0 moves; the others wait)."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for step, reason in damaged:
                target = self._step_path(step).with_name(f"{step}.damaged-{stamp}")
                suffix = 1
                while target.exists():  # damaged twice within a second
                    suffix += 1
                    target = self._step_path(step).with_name(f"{step}.damaged-{stamp}-{suffix}")
                self._step_path(step).rename(target)
                logging.warning("checkpoint step %d does not restore (%s); moved it to %s", step, reason, target)
        if self._process_count > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxopd: damaged checkpoints set aside")
        self.manager.reload()

    def _step_path(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.manager.directory) / str(step)

    def _data_file_to_read(self, step: int) -> str:
        """This process's data-state file, or, in a checkpoint written by another process count, process 0's when
        every process saved the same state; otherwise resuming would silently restart the data, so it raises."""
        written = {int(match.group(1)) for path in (self._step_path(step) / "data").glob("process_*-of-*.json")
                   if (match := re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name))}
        if not written or self._process_count in written:
            return self._data_file  # a damaged checkpoint lacking the file is skipped by the restore
        count = min(written)
        if not self._same_data_state:
            raise ValueError(
                f"checkpoint step {step} in {self.manager.directory} was written by {count} processes and this run "
                f"has {self._process_count}: each process's data-iterator position belongs to its shard of the data, "
                f"so resume with {count} processes, or start a new workdir from these weights with "
                f"init_from.path={self.manager.directory}")
        return f"process_0-of-{count}.json"

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _reason(error: Exception) -> str:
    """The first line of an error, short enough for a one-line report."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def step_directory(path: str | pathlib.Path) -> pathlib.Path:
    """A run's workdir or its `checkpoints/` directory (or one written by `save_model`) -> the directory of step
    checkpoints."""
    path = pathlib.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns that a directory opened read-only is read-only; that is what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


_READ_ONLY_NOTICE = _DropReadOnlyNotice()


def read_only_manager(path: str | pathlib.Path, item_handlers: dict[str, Any]) -> ocp.CheckpointManager:
    """A CheckpointManager that reads the step checkpoints of a run workdir, its `checkpoints/`, or a directory
    written by `save_model`, and never writes."""
    logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)  # once: addFilter skips a filter it has
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(step_directory(path).absolute(), item_handlers=item_handlers, options=options)


def read_run_config(path: str | pathlib.Path, step: Optional[int] = None) -> tuple[int, dict[str, Any]]:
    """(step, the run config saved with it) of a jaxopd checkpoint directory (a run workdir, its checkpoints/, or
    one written by `save_model`, whose config is only `{"model": ...}`); the newest step unless `step` is given."""
    directory = step_directory(path)
    manager = read_only_manager(directory, {"config": ocp.JsonCheckpointHandler()})
    steps = manager.all_steps()
    if not steps:
        manager.close()
        raise ValueError(f"no checkpoint steps in {directory}: expected a jaxopd run or a Hugging Face checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        manager.close()
        raise ValueError(f"{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}")
    run_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return step, run_config


def read_model_fields(path: str | pathlib.Path, step: Optional[int] = None) -> tuple[int, dict[str, Any]]:
    """(step, the `model` section of its saved config) of a jaxopd checkpoint directory (see read_run_config): what
    a run continuing from it sets as `config.model`."""
    step, run_config = read_run_config(path, step)
    return step, run_config["model"]


def load_params(path: str | pathlib.Path, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Params only from a jaxopd checkpoint directory (a run workdir or its checkpoints/; the newest step unless
    `step` is given), read into the shardings and layer layout of `abstract_params` (for fine-tuning from, or as a
    distillation teacher; a checkpoint in the other layout is converted, see the module docstring)."""
    manager = read_only_manager(path, {"params": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no jaxopd checkpoint in {path}: expected step directories written by jaxopd.train")
    model_fields = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]["model"]
    layouts = _layouts(model_fields, manager.item_metadata(step)["params"].tree, abstract_params)
    params = _read_in_saved_layout(layouts, abstract_params, lambda abstract: manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"])
    manager.close()
    return params


def has_train_state(path: str | pathlib.Path) -> bool:
    """Whether the newest checkpoint at `path` (a run workdir or its checkpoints/) holds an optimizer state (one
    written by `save_model` holds params only)."""
    directory = step_directory(path)
    steps = [int(child.name) for child in directory.iterdir() if child.name.isdigit()] if directory.is_dir() else []
    return bool(steps) and (directory / str(max(steps)) / "train").is_dir()


def load_opt_state(path: str | pathlib.Path, abstract_train: dict[str, Any], abstract_params: Any) -> Any:
    """The optimizer state of the newest checkpoint at `path` (a run workdir or its checkpoints/), read into the
    shardings and layer layout of `abstract_train` (the shape structs of {"opt_state", "step", "rng"}, as `save`
    writes them; `abstract_params` the run's params, which tell its layout): what a new stage carries over from the
    previous one (`init_from.optimizer="carry"`), converted like `load_params` when the layouts differ."""
    manager = read_only_manager(path, {"train": ocp.StandardCheckpointHandler(),
                                       "params": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise ValueError(f"no jaxopd checkpoint in {path}: expected step directories written by jaxopd.train")
    model_fields = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]["model"]
    layouts = _layouts(model_fields, manager.item_metadata(step)["params"].tree, abstract_params)
    train = _read_in_saved_layout(layouts, abstract_train, lambda abstract: manager.restore(
        step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract)))["train"])
    manager.close()
    return train["opt_state"]
