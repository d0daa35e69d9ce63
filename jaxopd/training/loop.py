"""The one loop every run goes through — pretraining and distillation alike.

restore the newest checkpoint or initialize (`init_from`) -> the evaluator's start values (step 0) -> for each step:
the batch source's batch -> the jitted train step -> metrics (fetched every `log_every` steps, so the host never waits
on the device in between), eval every `eval_every`, checkpoint every `checkpoint_every`, save and stop on preemption
-> a summary line -> on a finished run, the student exported as a Hugging Face checkpoint (`export_hf`). The run
holds workdir/.lock for its life (one run per workdir). The guard (guard.py) stops a run whose loss or gradient is
not finite or diverges, naming the last checkpoint saved before the trouble began. A failed
write (metrics, TensorBoard events, a checkpoint, whose async save errors are looked for after every step) stops the
run within a step, naming the last good checkpoint. SIGTERM or SIGINT saves and stops; a second one ends the process
at once.

What differs between runs is passed in: a `BatchSource` (the grain pipeline; or rollouts scored by a teacher) and an
`Evaluator` (held-out loss; or task accuracy and KL to the teacher).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Optional, Protocol

import jax

from jaxopd import export
from jaxopd.configdict import config_dict_of
from jaxopd.training import checkpoint, metrics as metrics_lib, sharding, workdir_lock
from jaxopd.training.config import ConfigError, RunConfig, differences_from_defaults, save_config
from jaxopd.training.flops import count_params
from jaxopd.training.guard import Guard, last_good_checkpoint
from jaxopd.training.objectives import Objective
from jaxopd.training.init_from import initial_state
from jaxopd.training.state import Run


class RunStopped(RuntimeError):
    """The run cannot go on; the message names the last good checkpoint."""


class NonFiniteLossError(RunStopped):
    """A non-finite or diverging loss or gradient (see guard.py)."""


class WriteFailedError(RunStopped):
    """Metrics, TensorBoard events or a checkpoint could not be written."""


class BatchSource(Protocol):
    """Each step's batch, and the position the checkpoint keeps."""

    same_state_on_every_process: bool  # True: get_state() is global (any process count resumes it)

    def next_batch(self, step: int, state: dict[str, Any]) -> tuple[dict[str, jax.Array], dict[str, float]]:
        """(batch `[microbatches, rows, seq]` global arrays, host figures of this step summed over processes: at least
        `tokens` trained on and `flops/training`; optionally other `flops/*` parts and figures to log)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class Evaluator(Protocol):
    headline: tuple[str, ...]  # the eval metrics the summary line shows before -> after

    def start(self, params: Any) -> dict[str, float]:
        """What a fresh run logs at step 0 (the eval before training and anything else worth knowing then)."""

    def __call__(self, params: Any) -> dict[str, float]:
        """eval/<name> values of `params`."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def preemption_flag():
    """A callable telling whether the run should save and stop: SIGTERM (TPU/GPU preemption) or SIGINT (Ctrl-C) on
    one process, where a second such signal ends the process at once; on several, JAX's preemption sync point so
    that every process stops at the same step."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        step = iter(range(sys.maxsize))
        return lambda: multihost_utils.reached_preemption_sync_point(next(step))
    received = []

    def handle(signum, frame):
        if received:  # the second: the default action (end the process), whatever the loop is doing
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        print(f"\n{signal.Signals(signum).name}: saving at the end of this step, then stopping (send it again to "
              "stop at once, unsaved)", file=sys.stderr, flush=True)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    return lambda: bool(received)


def run_loop(config: RunConfig, run: Run, objective: Objective, source: BatchSource, evaluator: Evaluator
             ) -> dict[str, Any]:
    """Runs (or resumes) `config` in `config.workdir`; returns the last logged metrics (eval ones included).
    Raises WorkdirLockedError when another run holds the workdir, RunStopped when the run cannot go on."""
    # Process 0 holds the lock, before anything is written to the workdir.
    with workdir_lock.hold(config.workdir, enabled=jax.process_index() == 0, process_count=jax.process_count()):
        return _run_loop(config, run, objective, source, evaluator)


def _run_loop(config: RunConfig, run: Run, objective: Objective, source: BatchSource, evaluator: Evaluator
              ) -> dict[str, Any]:
    is_main = jax.process_index() == 0  # the one that prints and writes metrics; every process checkpoints
    workdir = pathlib.Path(config.workdir)
    config_dict = config_dict_of(RunConfig, config)
    if is_main:
        _print_start(config_dict, run)
    checkpointer = checkpoint.Checkpointer(
        workdir / "checkpoints", every=config.checkpointing.checkpoint_every,
        keep=config.checkpointing.keep_checkpoints, async_save=config.checkpointing.async_checkpoints,
        same_data_state_on_every_process=source.same_state_on_every_process)
    # Raises IncompatibleCheckpointError before this run writes anything when the workdir holds another run's.
    try:
        restored = checkpointer.restore_latest(sharding.abstract_arrays(run.state, run.shardings),
                                               config_dict.to_dict())
    except BaseException:
        checkpointer.close()
        raise
    if is_main:
        save_config(config_dict, workdir)
    if restored is not None:
        state, loop_state = restored
        source.set_state(loop_state["source"])
        flops_total = loop_state["flops_total"]
    else:
        state, flops_total = initial_state(config.init_from, run, config.model.param_dtype), 0.0
    start = int(state["step"])
    if start >= config.steps:
        checkpointer.close()
        if is_main:
            print(f"{workdir} already holds a finished run: its newest checkpoint is step {start} and steps="
                  f"{config.steps}. Raise --config.steps to train further, or give a new --config.workdir.",
                  flush=True)
        return {}
    if config.export_hf:
        try:
            _check_export(config)
        except BaseException:
            checkpointer.close()
            raise

    checkpoints = pathlib.Path(checkpointer.manager.directory)
    saved = [start] if restored is not None else []  # checkpoint steps written (or restored) by this run
    saving: list[int] = []  # a save started and not yet seen on disk

    def stop_on_write_error(what: str, error: Exception) -> WriteFailedError:
        good = f"step {max(saved)} in {checkpoints}" if saved else f"none yet in {checkpoints}"
        return WriteFailedError(
            f"writing {what} failed ({type(error).__name__}: {error}); stopping. The last good checkpoint is "
            f"{good}. Free space or fix the permissions of {workdir}, then rerun the same command to resume.")

    def log(step: int, values: dict[str, Any]) -> None:
        try:
            writer.write(step, values)
        except OSError as error:
            raise stop_on_write_error(f"metrics to {workdir}", error) from error

    def check_saves(wait: bool = False) -> None:
        """Raises the error of a failed save: orbax's async thread keeps it (or only logs it), so a save counts
        when its step directory appears, renamed into place, with no save in flight."""
        try:
            if wait:
                checkpointer.wait()
            checkpointer.manager.check_for_errors()
            if saving and not checkpointer.manager.is_saving_in_progress():
                if not (checkpoints / str(saving[0])).is_dir():
                    raise OSError(f"the save of step {saving[0]} ended without writing {checkpoints / str(saving[0])}"
                                  " (see the orbax error above)")
                saved.append(saving.pop())
        except Exception as error:
            raise stop_on_write_error(f"the checkpoint of step {saving[0] if saving else '?'}", error) from error

    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    if start == 0:
        before = evaluator.start(state["params"])
        log(0, {**before, "flops/total": flops_total})
        if is_main and before:
            print("step 0: " + _describe(before), flush=True)
    else:  # the step-0 line of the run being resumed
        before = next(iter(_logged_metrics(workdir)), {}) if is_main else {}
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    bar = metrics_lib.ProgressBar(config.steps, start, headline=objective.headline,
                                  enabled=is_main and config.progress_bar)
    previous_handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    preempted = preemption_flag()
    guard = Guard(config.objective)
    pending, first, last, steps_done = [], {}, {}, start
    interval = {"tokens": 0.0, "flops/training": 0.0, "start": time.perf_counter(), "steps": 0}
    wall_start = time.perf_counter()

    def flush(step: int) -> None:
        """Fetches the metrics of the steps since the last flush, stops when the guard says so, logs `step`."""
        nonlocal pending, first, last
        fetched = jax.device_get(pending)
        pending = []
        for fetched_step, values, _ in fetched:
            trouble = guard.check(fetched_step, float(values["loss"]), float(values["grad_norm"]))
            if trouble is not None:
                raise NonFiniteLossError(_stop_message(*trouble, saved + saving, checkpoints, config))
        elapsed = max(time.perf_counter() - interval["start"], 1e-9)
        _, device_values, host_values = fetched[-1]
        values = {**device_values, **host_values}
        values.update(metrics_lib.moe_load_stats(values.pop("moe_load")))
        values.update({"flops/total": flops_total, "tokens_per_second": interval["tokens"] / elapsed,
                       "step_seconds": elapsed / interval["steps"]})
        if peak is not None:
            values["mfu"] = interval["flops/training"] / elapsed / (peak * jax.device_count())
        log(step, values)
        bar.update(step, values)
        first = first or {**values, "step": step}
        last = {**last, **values, "step": step}
        interval.update(tokens=0.0, **{"flops/training": 0.0}, start=time.perf_counter(), steps=0)

    stopped_by: Optional[BaseException] = None
    try:
        for step in range(start, config.steps):
            batch, host_values = source.next_batch(step, state)
            state, step_metrics = run.step_fn(state, batch)
            done = steps_done = step + 1
            check_saves()
            pending.append((done, step_metrics, host_values))
            flops_total += sum(value for key, value in host_values.items() if key.startswith("flops/"))
            interval["tokens"] += host_values["tokens"]
            interval["flops/training"] += host_values["flops/training"]
            interval["steps"] += 1
            was_preempted = preempted()
            stop = was_preempted or done == config.steps
            save = checkpointer.should_save(done) or stop
            if done % config.log_every == 0 or save:
                flush(done)
            if config.eval_every > 0 and (done % config.eval_every == 0 or done == config.steps):
                eval_values = evaluator(state["params"])
                log(done, {**eval_values, "flops/total": flops_total})
                bar.show_eval(eval_values)
                last = {**last, **eval_values}
            if save:
                if saving:  # the previous save must be on disk before this one starts
                    check_saves(wait=True)
                saving.append(done)
                try:
                    checkpointer.save(done, state, {"source": source.get_state(), "flops_total": flops_total},
                                      config_dict.to_dict())
                except Exception as error:
                    raise stop_on_write_error(f"the checkpoint of step {done}", error) from error
            if was_preempted:
                check_saves(wait=True)
                if is_main:
                    print(f"preempted: saved step {done}; rerun the same command to resume", flush=True)
                break
        check_saves(wait=True)
    except BaseException as error:
        stopped_by = error
        raise
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if not isinstance(stopped_by, WriteFailedError):  # after a failed write orbax's threads may never finish
            checkpointer.wait()
            checkpointer.close()
        bar.close()
        writer.close()
    if is_main:
        print(_summary(before, first, last, objective.headline, evaluator.headline, steps_done,
                       start, time.perf_counter() - wall_start, workdir), flush=True)
    if config.export_hf and steps_done == config.steps and is_main:
        copied = export.export_params(run.model.config, state["params"], config.export_hf,
                                      tokenizer=config.data.tokenizer)
        print(f"exported the student of step {steps_done} to {config.export_hf} (a Hugging Face checkpoint; "
              f"tokenizer files: {', '.join(copied) or 'none'})", flush=True)
    return last


def _check_export(config: RunConfig) -> None:
    """Before step 1: export_hf can be written when the run finishes (one process, an empty or new directory)."""
    if jax.process_count() > 1:
        raise ConfigError([f"export_hf={config.export_hf!r} writes from one process; on {jax.process_count()} "
                           "processes leave it empty and run python -m jaxopd.export on the final checkpoint"])
    try:
        export.check_out(config.export_hf, overwrite=False, key="export_hf", fix="empty it first")
    except ValueError as error:
        raise ConfigError([str(error)]) from None


def _print_start(config_dict: Any, run: Run) -> None:
    model = run.model.config
    params = count_params(model)["total"]
    print(f"model: {model.attention} attention, {model.num_layers} layers, d_model {model.d_model}"
          f"{f', {model.num_experts} experts' if model.num_experts else ''}, {params / 1e6:.2f}M params; "
          f"mesh {dict(run.mesh.shape)}", flush=True)
    changed = differences_from_defaults(config_dict)
    print("config (keys that differ from the defaults; all of them in workdir/config.json):\n" +
          "\n".join(f"  {key} = {value!r}" for key, value in changed.items()), flush=True)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in values.items() if key != "flops/total")


def _summary(before: dict[str, Any], first: dict[str, Any], last: dict[str, Any], train_headline: str,
             eval_headline: tuple[str, ...], steps_done: int, start: int, seconds: float,
             workdir: pathlib.Path) -> str:
    """One line: before -> after for the headline metrics, steps and wall time, where the outputs are."""
    parts = [f"{key} {before[key]:.4g} -> {last[key]:.4g}" for key in eval_headline if key in before and key in last]
    if train_headline in first and train_headline in last and first["step"] < last["step"]:
        parts.append(f"{train_headline} {first[train_headline]:.4g} -> {last[train_headline]:.4g}")
    return (f"done: steps {start} -> {steps_done} in {seconds:.0f} s; {', '.join(parts)}; outputs in {workdir} "
            "(metrics.jsonl, tensorboard/, checkpoints/, config.json)")


def _logged_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _stop_message(trouble: str, first_bad_step: int, saved: list[int], checkpoints: pathlib.Path,
                  config: RunConfig) -> str:
    """What went wrong, the last checkpoint from before it (not merely the newest) and those after it."""
    good = last_good_checkpoint(saved, first_bad_step)
    later = sorted(step for step in saved if good is None or step > good)
    if good is None:
        where = (f"No checkpoint predates it (step {first_bad_step}'s loss is computed on the params saved at step "
                 f"{first_bad_step - 1}): start again")
    else:
        where = f"The last good checkpoint is step {good} in {checkpoints}"
        if len([step for step in saved if step > good]) >= config.checkpointing.keep_checkpoints:
            where += f" (deleted since: keep_checkpoints={config.checkpointing.keep_checkpoints})"
    if later:
        where += (f"; checkpoints {later} were saved after the trouble began: delete them before resuming, "
                  "or the rerun resumes from the newest")
    return (f"{trouble}; stopping. {where}. Lower optimizer.schedule.peak_lr or raise warmup_steps; "
            "skip_nonfinite_steps=True skips single non-finite steps, divergence_factor=0 turns the divergence "
            "check off.")
