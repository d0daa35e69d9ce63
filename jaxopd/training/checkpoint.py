"""Checkpoints with orbax: params, optimizer state + step + RNG, the data iterator's state and the config.

One step directory holds four items: `params` and `train` (opt_state, step, rng) as sharded arrays,
`data` (each process's iterator `get_state()` as process_<i>-of-<n>.json) and `config` (the resolved config).
A run resumes on the process count that wrote its checkpoint, unless its data state is the same on every process
(`same_data_state_on_every_process`, as distillation's global prompt position), which any count reads.
Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when every item is committed),
so an interrupted save never looks like a checkpoint. A finished checkpoint that fails to restore (a truncated or
deleted file) is reported and the previous one used.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


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

    def restore_latest(self, abstract_state: dict[str, Any]) -> Optional[tuple[dict[str, Any], Any]]:
        """(state, data_state) of the newest checkpoint that restores, or None when there is none.

        `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct with .sharding) so arrays are
        read straight into their shards.
        """
        abstract_train = {key: value for key, value in abstract_state.items() if key != "params"}
        for step in sorted(self.manager.all_steps(), reverse=True):
            data_file = self._data_file_to_read(step)
            items = dict(params=ocp.args.StandardRestore(abstract_state["params"]),
                         train=ocp.args.StandardRestore(abstract_train))
            try:
                if data_file == self._data_file:
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items, data=ocp.args.JsonRestore()))
                else:  # written by another process count: the state every process saved alike
                    restored = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
                    restored["data"] = json.loads((self._step_path(step) / "data" / data_file).read_text())
            except Exception as error:  # a damaged checkpoint: any read error; fall back to the one before
                logging.warning("checkpoint at step %d in %s does not restore (%s: %s); trying the previous one",
                                step, self.manager.directory, type(error).__name__, error)
                continue
            return {"params": restored["params"], **restored["train"]}, restored["data"]
        return None

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


def load_params(path: str | pathlib.Path, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Params only from a jaxopd checkpoint directory (a run workdir or its checkpoints/; the newest step unless
    `step` is given), read into the shardings of `abstract_params` (for fine-tuning from, or as a distillation
    teacher)."""
    manager = read_only_manager(path, {"params": ocp.StandardCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no jaxopd checkpoint in {path}: expected step directories written by jaxopd.train")
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    manager.close()
    return params["params"]
