"""The one loop every run goes through — pretraining and distillation alike.

restore the newest checkpoint or initialize (`init_from`) -> the evaluator's start values (step 0) -> for each step:
the batch source's batch -> the jitted train step -> metrics (fetched every `log_every` steps, so the host never waits
on the device in between), eval every `eval_every`, checkpoint every `checkpoint_every`, save and stop on preemption
-> a summary line. A NaN/Inf loss or gradient stops the run naming the last good checkpoint.

What differs between runs is passed in: a `BatchSource` (the grain pipeline; or rollouts scored by a teacher) and an
`Evaluator` (held-out loss; or task accuracy and KL to the teacher).
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time
from typing import Any, Optional, Protocol

import jax
import numpy as np

from jaxopd.configdict import config_dict_of
from jaxopd.training import checkpoint, metrics as metrics_lib, sharding
from jaxopd.training.config import RunConfig, differences_from_defaults
from jaxopd.training.flops import count_params
from jaxopd.training.objectives import Objective
from jaxopd.training.state import Run, load_initial_params


class NonFiniteLossError(RuntimeError):
    pass


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


def preemption_flag():
    """A callable telling whether the run should save and stop: SIGTERM (TPU/GPU preemption) on one process;
    on several, JAX's preemption sync point so that every process stops at the same step."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        step = iter(range(sys.maxsize))
        return lambda: multihost_utils.reached_preemption_sync_point(next(step))
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    return lambda: bool(received)


def run_loop(config: RunConfig, run: Run, objective: Objective, source: BatchSource, evaluator: Evaluator
             ) -> dict[str, Any]:
    """Runs (or resumes) `config` in `config.workdir`; returns the last logged metrics (eval ones included)."""
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
        (workdir / "config.json").write_text(json.dumps(config_dict.to_dict(), indent=2, sort_keys=True))
    if restored is not None:
        state, loop_state = restored
        source.set_state(loop_state["source"])
        flops_total = loop_state["flops_total"]
    else:
        state, flops_total = run.state, 0.0
        params = load_initial_params(config.init_from, run, config.model.param_dtype)
        if params is not None:
            state = {**state, "params": params}
    start = int(state["step"])
    if start >= config.steps:
        checkpointer.close()
        if is_main:
            print(f"{workdir} already holds a finished run: its newest checkpoint is step {start} and steps="
                  f"{config.steps}. Raise --config.steps to train further, or give a new --config.workdir.",
                  flush=True)
        return {}

    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    if start == 0:
        before = evaluator.start(state["params"])
        writer.write(0, {**before, "flops/total": flops_total})
        if is_main and before:
            print("step 0: " + _describe(before), flush=True)
    else:  # the step-0 line of the run being resumed
        before = next(iter(_logged_metrics(workdir)), {}) if is_main else {}
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    bar = metrics_lib.ProgressBar(config.steps, start, headline=objective.headline,
                                  enabled=is_main and config.progress_bar)
    preempted = preemption_flag()
    pending, first, last, steps_done = [], {}, {}, start
    interval = {"tokens": 0.0, "flops/training": 0.0, "start": time.perf_counter(), "steps": 0}
    wall_start = time.perf_counter()

    def flush(step: int) -> None:
        """Fetches the metrics of the steps since the last flush, stops on a non-finite loss, logs `step`."""
        nonlocal pending, first, last
        fetched = jax.device_get(pending)
        pending = []
        for fetched_step, values, _ in fetched:
            if not np.isfinite([values["loss"], values["grad_norm"]]).all() and \
                    not config.objective.skip_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {fetched_step}; stopping. "
                    f"The last good checkpoint is step {checkpointer.manager.latest_step()} in "
                    f"{workdir / 'checkpoints'} (this step is not saved). Lower optimizer.schedule.peak_lr, raise "
                    "warmup_steps, or set skip_nonfinite_steps=True to skip such steps.")
        elapsed = max(time.perf_counter() - interval["start"], 1e-9)
        _, device_values, host_values = fetched[-1]
        values = {**device_values, **host_values}
        values.update(metrics_lib.moe_load_stats(values.pop("moe_load")))
        values.update({"flops/total": flops_total, "tokens_per_second": interval["tokens"] / elapsed,
                       "step_seconds": elapsed / interval["steps"]})
        if peak is not None:
            values["mfu"] = interval["flops/training"] / elapsed / (peak * jax.device_count())
        writer.write(step, values)
        bar.update(step, values)
        first = first or {**values, "step": step}
        last = {**last, **values, "step": step}
        interval.update(tokens=0.0, **{"flops/training": 0.0}, start=time.perf_counter(), steps=0)

    try:
        for step in range(start, config.steps):
            batch, host_values = source.next_batch(step, state)
            state, step_metrics = run.step_fn(state, batch)
            done = steps_done = step + 1
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
                writer.write(done, {**eval_values, "flops/total": flops_total})
                bar.show_eval(eval_values)
                last = {**last, **eval_values}
            if save:
                checkpointer.save(done, state, {"source": source.get_state(), "flops_total": flops_total},
                                  config_dict.to_dict())
            if was_preempted:
                if is_main:
                    print(f"preempted: saved step {done}; rerun the same command to resume", flush=True)
                break
    finally:
        checkpointer.wait()
        checkpointer.close()
        bar.close()
        writer.close()
    if is_main:
        print(_summary(before, first, last, objective.headline, evaluator.headline, steps_done,
                       start, time.perf_counter() - wall_start, workdir), flush=True)
    return last


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
