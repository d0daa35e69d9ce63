"""`python -m jaxopd.train --config=configs/<name>.py [--config.key=value ...]`: config -> mesh -> state -> step loop
-> metrics and checkpoints, in config.workdir. Running the same command again with the same workdir resumes.

Reads top to bottom: `StepBatches` (this process's share of every step's batch), `build(config)` (mesh, model,
sharded state, jitted steps), `train(config)` (the loop), then the CLI.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from jaxopd import checkpoint, config as config_lib, metrics as metrics_lib, optim, sharding, train_step
from jaxopd.data.pipeline import make_pipeline, resolve_path
from jaxopd.flops import flops_per_token
from jaxopd.model import Transformer


class NonFiniteLossError(RuntimeError):
    pass


class StepBatches:
    """This process's rows of each step's batch, `[microbatches, rows, seq]` numpy.

    The data is cut into `config.data_shards` pipelines (0: one per process), each process reading its own
    contiguous group; so with data_shards fixed the global batches are the same whatever the number of processes.
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str = "train", num_batches: Optional[int] = None):
        process_count, process_index = jax.process_count(), jax.process_index()
        shards = config.data_shards or process_count
        if shards % process_count or config.microbatch_size % shards:
            raise ValueError(f"data_shards={shards} must be a multiple of the {process_count} processes and divide "
                             f"microbatch_size={config.microbatch_size}")
        per_process = shards // process_count
        self.iterators = [
            make_pipeline(config.data, seq_len=config.seq_len, batch_size=config.microbatch_size // shards,
                          seed=config.seed, process_index=process_index * per_process + i, process_count=shards,
                          split=split, num_batches=num_batches)
            for i in range(per_process)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next(1)

    def next(self, microbatches: int) -> dict[str, np.ndarray]:
        rows = [[next(iterator) for iterator in self.iterators] for _ in range(microbatches)]
        return {key: np.stack([np.concatenate([part[key] for part in row]) for row in rows]) for key in rows[0][0]}

    def get_state(self) -> list[Any]:
        return [iterator.get_state() for iterator in self.iterators]

    def set_state(self, state: list[Any]) -> None:
        if len(state) != len(self.iterators):
            raise ValueError(f"checkpointed data state has {len(state)} shards for this process, the run has "
                             f"{len(self.iterators)}: resume with the same data_shards and process count")
        for iterator, shard_state in zip(self.iterators, state):
            iterator.set_state(shard_state)


def validate(config: ml_collections.ConfigDict) -> None:
    """Config errors that would otherwise surface deep inside jit, raised with the fix."""
    if config.loss not in train_step.OBJECTIVES:
        raise ValueError(f"config.loss={config.loss!r}: available losses are {sorted(train_step.OBJECTIVES)}")
    if config.microbatch_size <= 0 or config.batch_size % config.microbatch_size:
        raise ValueError(f"batch_size={config.batch_size} must be a positive multiple of "
                         f"microbatch_size={config.microbatch_size} (gradient accumulation steps = their ratio)")
    if config.steps <= 0 or config.seq_len < 2:
        raise ValueError(f"steps={config.steps} must be positive and seq_len={config.seq_len} at least 2")


def unigram_entropy(config: ml_collections.ConfigDict, num_batches: int) -> float:
    """Entropy (nats) of the training targets' unigram distribution over the first `num_batches` microbatches,
    the loss of the best context-free predictor: a trained model should beat it clearly."""
    counts = np.zeros(config.model.vocab_size, np.int64)
    batches = StepBatches(config)
    for _ in range(num_batches):
        batch = next(batches)
        np.add.at(counts, batch["targets"][batch["loss_mask"] > 0], 1)
    return metrics_lib.unigram_entropy(counts)


def load_initial_params(config: ml_collections.ConfigDict, run: "Run") -> None:
    """Replaces freshly initialized params with params from config.init_from: a jaxopd run's checkpoint, or a Hugging
    Face checkpoint (read straight into its shards; params it lacks, e.g. MTP modules transformers drops, keep their
    initialization and are listed)."""
    source = config.init_from
    if not source.path:
        return
    source_path = resolve_path(source.path)  # the bundled checkpoints are found from any working directory
    abstract = sharding.abstract_arrays(run.state["params"], run.shardings["params"])
    if source.kind == "checkpoint":
        run.state["params"] = checkpoint.load_params(source_path, abstract)
        return
    if source.kind != "hf":
        raise ValueError(f"init_from.kind={source.kind!r}: use 'checkpoint' or 'hf'")
    from jaxopd import load_hf  # the optional Hugging Face import path, only needed here

    _, loaded = load_hf(source_path, dtype=config.model.param_dtype, mesh=run.mesh, rules=sharding.LOGICAL_AXIS_RULES)
    loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    current = jax.tree_util.tree_flatten_with_path(run.state["params"])
    unknown = set(loaded) - {path for path, _ in current[0]}
    if unknown:
        raise ValueError(f"{source.path} has params config.model does not: {sorted(map(jax.tree_util.keystr, unknown))[:5]}"
                         "; make the model preset match the checkpoint")
    leaves = []
    for path, leaf in current[0]:
        new = loaded.get(path, leaf)
        if new.shape != leaf.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: checkpoint shape {new.shape} != model shape {leaf.shape}")
        leaves.append(new.astype(leaf.dtype))
    missing = [jax.tree_util.keystr(path) for path, _ in current[0] if path not in loaded]
    if missing and jax.process_index() == 0:
        print(f"init_from: {len(missing)} params not in {source.path} keep their initialization: {missing[:5]}")
    run.state["params"] = jax.device_put(jax.tree.unflatten(current[1], leaves), run.shardings["params"])


@dataclasses.dataclass
class Run:
    """What a run is made of: the mesh, the model, its freshly initialized sharded state, and the jitted steps
    (`step_fn(state, batch)` donates the state; batches are `[microbatches, rows, seq]` global arrays)."""

    mesh: jax.sharding.Mesh
    model: Transformer
    state: dict[str, Any]
    shardings: dict[str, Any]
    step_fn: Any
    eval_fn: Any


def build(config: ml_collections.ConfigDict, devices: Optional[list[jax.Device]] = None) -> Run:
    """Mesh over `devices` (default all), model, optimizer, state created in its shards, jitted train/eval steps."""
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divisible(config.microbatch_size, mesh)
    model = Transformer(config_lib.to_model_config(config.model))
    optimizer = optim.make_optimizer(config.optimizer)
    example = np.zeros((1, config.seq_len), np.int32)
    state, shardings = train_step.create_state(model, optimizer, mesh, config.seed, example)
    batch_sharding = sharding.batch_sharding(mesh, leading_axes=1)
    step_fn = jax.jit(train_step.make_train_step(model, optimizer, config, shardings["params"]), donate_argnums=0,
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    eval_fn = jax.jit(train_step.make_eval_step(model, config), in_shardings=(shardings["params"], batch_sharding))
    return Run(mesh, model, state, shardings, sharding.within_mesh(mesh, step_fn),
               sharding.within_mesh(mesh, eval_fn))


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config`; returns the last logged metrics."""
    sharding.initialize_distributed(config.distributed)
    from jaxopd.distill import DISTILL_LOSSES  # registers the distillation objectives in train_step.OBJECTIVES
    if config.loss in DISTILL_LOSSES:  # rollouts -> teacher scores -> this same train_step (jaxopd/distill/)
        from jaxopd.distill.driver import train_distill
        return train_distill(config)
    validate(config)
    is_main = jax.process_index() == 0
    workdir = pathlib.Path(config.workdir)
    if is_main:
        print(config_lib.config_to_json(config), flush=True)
        config_lib.save_config(config, workdir)
    run = build(config)
    mesh, state, shardings = run.mesh, run.state, run.shardings
    ramp = optim.batch_ramp(config.batch_size, config.seq_len, config.microbatch_size, config.batch_ramp.start,
                            config.batch_ramp.tokens)
    data = StepBatches(config)
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", every=config.checkpoint_every,
                                           keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    restored = checkpointer.restore_latest(sharding.abstract_arrays(state, shardings))
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
    else:
        load_initial_params(config, run)
        state = run.state
    start = int(state["step"])
    step_fn, eval_fn = run.step_fn, run.eval_fn
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    if is_main and start == 0 and config.unigram_entropy_batches > 0:
        entropy = unigram_entropy(config, config.unigram_entropy_batches)
        print(f"unigram entropy of the training targets: {entropy:.4f} nats", flush=True)
        writer.write(0, {"unigram_entropy": entropy})
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    train_flops_per_token = model_flops_per_token(config) if peak is not None else None
    preempted = preemption_flag()
    bar = metrics_lib.ProgressBar(config.steps, start, enabled=is_main and config.progress_bar)
    pending, last, interval_tokens, interval_start = [], {}, 0, time.perf_counter()

    def flush(step: int) -> None:
        """Fetches the metrics of the steps since the last flush, stops on a non-finite loss, logs `step`."""
        nonlocal pending, last, interval_tokens, interval_start
        fetched = jax.device_get(pending)
        pending = []
        for fetched_step, values in fetched:
            if not np.isfinite([values["loss"], values["grad_norm"]]).all() and not config.skip_nonfinite_steps:
                good = checkpointer.manager.latest_step()
                raise NonFiniteLossError(
                    f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {fetched_step}; stopping. The last good checkpoint is step "
                    f"{good} in {workdir / 'checkpoints'} (this step is not saved). Lower optimizer.schedule.peak_lr, "
                    f"raise warmup_steps, or set skip_nonfinite_steps=True to skip such steps.")
        elapsed = time.perf_counter() - interval_start
        values = dict(fetched[-1][1])
        values.update(metrics_lib.moe_load_stats(values.pop("moe_load")))
        values["tokens_per_second"] = interval_tokens / max(elapsed, 1e-9)
        if peak is not None:
            values["mfu"] = values["tokens_per_second"] * train_flops_per_token / (peak * jax.device_count())
        writer.write(step, values)
        bar.update(step, values)
        last, interval_tokens, interval_start = values, 0, time.perf_counter()

    try:
        for step in range(start, config.steps):
            microbatches = ramp.batch_size(step) // config.microbatch_size
            batch = sharding.global_batch(data.next(microbatches), mesh, leading_axes=1)
            state, step_metrics = step_fn(state, batch)
            done = step + 1
            pending.append((done, step_metrics))
            interval_tokens += microbatches * config.microbatch_size * config.seq_len
            was_preempted = preempted()
            stop = was_preempted or done == config.steps
            if done % config.log_every == 0 or checkpointer.should_save(done) or stop:
                flush(done)
            if config.eval_every > 0 and (done % config.eval_every == 0 or done == config.steps):
                writer.write(done, evaluate(config, eval_fn, state["params"], mesh))
            if checkpointer.should_save(done) or stop:
                checkpointer.save(done, state, data.get_state(), config.to_dict())
            if was_preempted:
                print(f"preempted: saved step {done}; rerun the same command to resume", flush=True)
                break
    finally:
        checkpointer.wait()
        checkpointer.close()
        bar.close()
        writer.close()
    return last


def evaluate(config: ml_collections.ConfigDict, eval_fn: Any, params: Any, mesh: Any) -> dict[str, float]:
    """Token-weighted mean of the objective over data.eval_batches held-out microbatches, as eval/<name>."""
    sums, weight = {}, 0.0
    for batch in StepBatches(config, split="eval", num_batches=config.data.eval_batches):
        values = jax.device_get(eval_fn(params, sharding.global_batch(batch, mesh, leading_axes=1)))
        tokens = float(values.pop("tokens"))
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value) * tokens
        weight += tokens
    return {f"eval/{name}": total / max(weight, 1.0) for name, total in sums.items()}


def model_flops_per_token(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs per token (forward + backward, MTP included) of config.model at config.seq_len."""
    return flops_per_token(config_lib.to_model_config(config.model), config.seq_len, training=True)


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


def main(argv: list[str]) -> None:
    from absl import flags, logging
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        train(flags.FLAGS.config)
    except (NonFiniteLossError, ValueError) as error:
        sys.exit(f"error: {error}")


def run() -> None:
    """CLI entry: misspelt `--config.` keys are reported (with close valid keys) before absl parses anything."""
    from absl import app, flags
    from ml_collections import config_flags

    config_path = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--config=")),
                       str(config_lib.REPO_ROOT / "configs" / "tiny_pretrain.py"))
    try:
        config_lib.check_override_keys(config_lib.load_config_file(config_path), sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    config_flags.DEFINE_config_file("config", config_path, "run config file (configs/*.py)", lock_config=True)
    app.run(main)


if __name__ == "__main__":
    run()
