"""The distillation loop behind `python -m jaxopd.train --config=configs/tiny_distill.py` (config.loss in
DISTILL_LOSSES): prompts -> rollouts -> teacher scores -> the trainer's train_step, with eval, FLOP accounting,
metrics and checkpoints (exact resume: same workdir, same command).

Per step: `batch_size / group_size` prompts from the grain prompt stream, `group_size` samples each from the student
("reverse_kl", "grpo", the full divergences) or from the teacher ("teacher_sft"); the teacher scores the student's
tokens in one forward pass; rewards come from the task's checker; then one optimizer step. Every `eval_every` steps:
greedy task accuracy and the exact per-token reverse KL KL(student || teacher) on student samples of held-out prompts.

On several processes (jax.distributed) each process takes an equal contiguous share of every step's prompts (and of
the held-out prompts); its rows join the others' in global arrays, in process order, for the sampler, the teacher
and the step, so a run computes the same as one process with the same devices. Texts, rewards and FLOP counts are
per process and summed over all; process 0 prints and writes the metrics.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxopd import checkpoint, config as config_lib, metrics as metrics_lib, optim, sharding, train, train_step
from jaxopd.data.pipeline import resolve_path
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill import objectives, policy_gradient, rollouts as rollouts_lib, teacher as teacher_lib
from jaxopd.kernels import losses
from jaxopd.model import unembedding
from jaxopd.sampling import Sampler
from jaxopd.tasks import arithmetic

TASK_CHECKERS: dict[str, Callable[[str, str], bool]] = {"arithmetic": arithmetic.check}


def validate(config: ml_collections.ConfigDict) -> None:
    """Config errors of a distillation run, raised with the fix before anything is compiled."""
    distill = config.distill
    if config.loss not in objectives.DISTILL_LOSSES:
        raise ValueError(f"config.loss={config.loss!r}: the distillation driver runs {objectives.DISTILL_LOSSES}")
    if distill.group_size < 1 or config.batch_size % distill.group_size:
        raise ValueError(f"batch_size={config.batch_size} (rollouts per step) must be a multiple of "
                         f"distill.group_size={distill.group_size} (samples per prompt)")
    if config.batch_ramp.start:
        raise ValueError("batch_ramp is not supported by the distillation driver; set batch_ramp.start=0")
    if config.seq_len != distill.max_prompt_len + distill.max_new_tokens:
        raise ValueError(f"seq_len={config.seq_len} must equal distill.max_prompt_len + distill.max_new_tokens = "
                         f"{distill.max_prompt_len + distill.max_new_tokens} (one row holds prompt + completion)")
    if distill.task not in TASK_CHECKERS:
        raise ValueError(f"distill.task={distill.task!r}: known tasks are {sorted(TASK_CHECKERS)}")
    if not distill.teacher:
        raise ValueError("distill.teacher is empty: give a jaxopd checkpoint or Hugging Face directory")
    processes, prompts_per_step = jax.process_count(), config.batch_size // distill.group_size
    if prompts_per_step % processes or distill.eval_prompts_count % processes:
        raise ValueError(f"each of the {processes} processes samples an equal share of the prompts: batch_size / "
                         f"distill.group_size = {prompts_per_step} prompts per step and distill.eval_prompts_count="
                         f"{distill.eval_prompts_count} must both be multiples of {processes}")
    if distill.normalize not in ("tokens", "sequences"):
        raise ValueError(f"distill.normalize={distill.normalize!r} must be 'tokens' or 'sequences'")


@dataclasses.dataclass
class Distiller:
    """Everything a distillation run holds besides its loop state."""

    config: ml_collections.ConfigDict
    run: train.Run
    tokenizer: Any
    teacher_model: Any
    teacher_params: Any
    student_sampler: Sampler
    teacher_sampler: Sampler
    scorer: Any
    eval_kl: Any
    checker: Callable[[str, str], bool]
    eval_prompts: list[str]  # this process's share of the held-out prompts
    microbatches: Any  # (layout, rewards) -> the train_step batch, see step_batch
    teacher_unembed: Optional[jax.Array]  # [microbatches, d_teacher, vocab] replicated, for the full divergences


def build(config: ml_collections.ConfigDict) -> Distiller:
    """Student (the trainer's mesh, model, sharded state), teacher on the same mesh, samplers, jitted scorer/step."""
    distill = config.distill
    run = train.build(config)
    tokenizer = load_tokenizer(resolve_path(config.data.tokenizer), kind=config.data.tokenizer_kind)
    teacher_model, teacher_params = teacher_lib.load_model(resolve_path(distill.teacher), run.mesh)
    teacher_tokenizer = load_tokenizer(resolve_path(distill.teacher_tokenizer or config.data.tokenizer))
    teacher_lib.check_tokenizers(run.model.config, teacher_model.config, tokenizer, teacher_tokenizer)
    divergence = config.loss in objectives.DIVERGENCE_LOSSES
    # The trainer's step, jitted here so that the teacher's unembedding (full divergences) is replicated, not split
    # like the rows of the batch.
    sharding.check_batch_divisible(distill.eval_prompts_count, run.mesh, "distill.eval_prompts_count")
    row_sharding = sharding.batch_sharding(run.mesh, leading_axes=1)
    replicated = NamedSharding(run.mesh, PartitionSpec())
    batch_keys = ["tokens", "targets", "positions", "segment_ids", "loss_mask", "target_sampler_logprobs",
                  "teacher_logprobs", "task_advantages"] + (["teacher_hidden"] if divergence else [])
    batch_shardings = {key: row_sharding for key in batch_keys}
    if divergence:
        batch_shardings["teacher_unembed"] = replicated
    step_fn = jax.jit(train_step.make_train_step(run.model, optim.make_optimizer(config.optimizer), config),
                      donate_argnums=0, in_shardings=(run.shardings, batch_shardings),
                      out_shardings=(run.shardings, None))
    run = dataclasses.replace(run, step_fn=sharding.within_mesh(run.mesh, step_fn))
    samplers = [Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
                for model in (run.model, teacher_model)]

    def eval_kl(student_params, params_of_teacher, layout):
        """Exact full-vocabulary KL(student || teacher) summed over the completion tokens, and their count."""
        hidden = [model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                              positions=layout["positions"], method="features").hidden
                  for model, params in ((run.model, student_params), (teacher_model, params_of_teacher))]
        per_token = losses.chunked_divergence(
            hidden[0], unembedding(student_params, run.model.config), hidden[1],
            unembedding(params_of_teacher, teacher_model.config), chunk_size=config.loss_chunk_size,
            temperature=distill.temperature)
        return jnp.sum(per_token * layout["loss_mask"]), jnp.sum(layout["loss_mask"])

    micro = config.batch_size // config.microbatch_size

    def microbatches(layout, rewards):
        """The step's rows `[batch, ...]` with their group-normalized task advantages, as `[micro, rows, ...]`."""
        advantages = policy_gradient.group_normalized_advantages(rewards, distill.group_size)
        layout = {**layout, "task_advantages": advantages[:, None] * layout["loss_mask"]}
        return {key: value.reshape(micro, config.microbatch_size, *value.shape[1:]) for key, value in layout.items()}

    def repeated_unembed(params):
        unembed = unembedding(params, teacher_model.config)
        return jnp.broadcast_to(unembed, (micro, *unembed.shape))

    teacher_unembed = None
    if divergence:  # a global replicated array, whatever the teacher's own sharding
        teacher_unembed = jax.jit(repeated_unembed, out_shardings=replicated)(teacher_params)
    eval_prompts = rollouts_lib.read_prompts(distill.eval_prompts, distill.prompt_field, distill.eval_prompts_count)
    share = distill.eval_prompts_count // jax.process_count()
    eval_prompts = eval_prompts[jax.process_index() * share:(jax.process_index() + 1) * share]
    return Distiller(config, run, tokenizer, teacher_model, teacher_params, samplers[0], samplers[1],
                     teacher_lib.make_scorer(teacher_model, config.loss_chunk_size, return_hidden=divergence),
                     jax.jit(eval_kl), TASK_CHECKERS[distill.task], eval_prompts,
                     jax.jit(microbatches, out_shardings=row_sharding), teacher_unembed)


def _sample(d: Distiller, sampler: Sampler, params: Any, prompts: list[str], rng: jax.Array, group_size: int,
            **options: Any) -> rollouts_lib.Rollouts:
    with sharding.mesh_context(d.run.mesh):
        return rollouts_lib.rollout(sampler, params, d.tokenizer, prompts, rng, group_size=group_size,
                                    add_bos=d.config.data.add_bos, checker=d.checker, mesh=d.run.mesh, **options)


def _mean(total: float, count: int) -> float:
    """total / count rounded to float32, as numpy's mean of `count` float32 values summing to `total` is."""
    return float(np.float32(total) / np.float32(count))


def _accuracy(rollouts: rollouts_lib.Rollouts, count: int) -> float:
    """Mean reward over the `count` rows of all processes, from this process's rows."""
    return _mean(sharding.process_sum({"correct": float(rollouts.rewards.sum())})["correct"], count)


def evaluate(d: Distiller, params: Any, rng: jax.Array, teacher: bool = False) -> dict[str, float]:
    """eval/accuracy (greedy, the task's checker) and eval/reverse_kl (exact per-token KL(student || teacher) on one
    temperature-`distill.temperature` student sample per held-out prompt); with teacher=True, the teacher's
    greedy accuracy as eval/teacher_accuracy."""
    if teacher:
        greedy = _sample(d, d.teacher_sampler, d.teacher_params, d.eval_prompts, rng, 1, greedy=True)
        return {"eval/teacher_accuracy": _accuracy(greedy, d.config.distill.eval_prompts_count)}
    greedy = _sample(d, d.student_sampler, params, d.eval_prompts, rng, 1, greedy=True)
    sampled = _sample(d, d.student_sampler, params, d.eval_prompts, rng, 1, temperature=d.config.distill.temperature)
    with sharding.mesh_context(d.run.mesh):
        kl_sum, count = jax.device_get(d.eval_kl(params, d.teacher_params, sampled.layout))
    return {"eval/accuracy": _accuracy(greedy, d.config.distill.eval_prompts_count),
            "eval/reverse_kl": float(kl_sum / max(count, 1.0))}


def step_batch(d: Distiller, rollouts: rollouts_lib.Rollouts) -> tuple[dict[str, Any], dict[str, float]]:
    """The train_step batch `[microbatches, rows, seq]` (global arrays) for one step's rollouts, and timing of the
    teacher pass."""
    config, distill = d.config, d.config.distill
    layout = dict(rollouts.layout)
    timings = {}
    if config.loss != "teacher_sft" and config.loss != "grpo":
        start = time.perf_counter()
        with sharding.mesh_context(d.run.mesh):
            scores = jax.block_until_ready(d.scorer(d.teacher_params, layout))
        timings["teacher_seconds"] = time.perf_counter() - start
        layout["teacher_logprobs"] = scores["logprobs"]
        if "hidden" in scores:
            layout["teacher_hidden"] = scores["hidden"]
    else:
        layout["teacher_logprobs"] = layout["target_sampler_logprobs"]
    rewards = sharding.global_batch({"rewards": rollouts.rewards}, d.run.mesh)["rewards"]
    with sharding.mesh_context(d.run.mesh):
        batch = d.microbatches(layout, rewards)
    if d.teacher_unembed is not None:
        batch["teacher_unembed"] = d.teacher_unembed
    return batch, timings


def _print_eval(label: str, values: dict[str, float]) -> None:
    print(f"student {label}: accuracy {values['eval/accuracy']:.3f}, reverse KL to the teacher "
          f"{values['eval/reverse_kl']:.4f} nats/token", flush=True)


def train_distill(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) the distillation described by `config`; returns the last logged metrics."""
    validate(config)
    distill = config.distill
    workdir = pathlib.Path(config.workdir)
    is_main = jax.process_index() == 0  # the one that prints and writes metrics; every process checkpoints
    if is_main:
        print(config_lib.config_to_json(config), flush=True)
        config_lib.save_config(config, workdir)
    d = build(config)
    run = d.run
    prompts = rollouts_lib.PromptStream(distill.prompts, distill.prompt_field, config.seed, jax.process_index(),
                                        jax.process_count())
    # The prompt position and cumulative FLOPs are global, saved alike by every process: any process count resumes.
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", every=config.checkpoint_every,
                                           keep=config.keep_checkpoints, async_save=config.async_checkpoints,
                                           same_data_state_on_every_process=True)
    state, flops_total = run.state, 0.0
    restored = checkpointer.restore_latest(sharding.abstract_arrays(run.state, run.shardings))
    if restored is not None:
        state, loop_state = restored
        prompts.set_state(loop_state["prompts"])
        flops_total = loop_state["flops_total"]
    else:
        train.load_initial_params(config, run)
        state = run.state
    start = int(state["step"])
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    eval_rng = jax.random.key(config.seed + 1)  # the same eval samples at every eval
    rng = jax.random.key(config.seed)
    student_config, teacher_config = run.model.config, d.teacher_model.config
    before = None
    if start == 0:
        before = {**evaluate(d, state["params"], eval_rng), **evaluate(d, None, eval_rng, teacher=True)}
        if is_main:
            print(f"teacher: accuracy {before['eval/teacher_accuracy']:.3f}", flush=True)
            _print_eval("before", before)
        writer.write(0, {**before, "flops/total": flops_total})
    bar = metrics_lib.ProgressBar(config.steps, start, enabled=is_main and config.progress_bar)
    preempted = train.preemption_flag()
    last = {}
    try:
        for step in range(start, config.steps):
            step_start = time.perf_counter()
            step_prompts = prompts.next(config.batch_size // distill.group_size)
            teacher_samples = config.loss == "teacher_sft"
            sampler, params = (d.teacher_sampler, d.teacher_params) if teacher_samples else (d.student_sampler,
                                                                                             state["params"])
            sample_start = time.perf_counter()
            rollouts = _sample(d, sampler, params, step_prompts, jax.random.fold_in(rng, step), distill.group_size,
                               temperature=distill.temperature)
            sample_seconds = time.perf_counter() - sample_start
            batch, timings = step_batch(d, rollouts)
            train_start = time.perf_counter()
            state, step_metrics = run.step_fn(state, batch)
            step_metrics = jax.device_get(step_metrics)
            train_seconds = time.perf_counter() - train_start
            # Per-row counts over this process's rows, summed over the processes.
            segment_ids = sharding.local_rows(rollouts.layout["segment_ids"])
            counts = sharding.process_sum({
                "flops/sampling": rollouts_lib.sampling_flops(teacher_config if teacher_samples else student_config,
                                                              rollouts.prompt_lengths, rollouts.completion_lengths),
                "flops/teacher_scoring": rollouts_lib.sequence_flops(teacher_config, segment_ids, training=False)
                if "teacher_seconds" in timings else 0.0,
                "flops/training": rollouts_lib.sequence_flops(student_config, segment_ids, training=True),
                "correct": float(rollouts.rewards.sum()), "generated": float(rollouts.completion_lengths.sum()),
                "tokens": float(segment_ids.astype(bool).sum())})
            flops = {key: value for key, value in counts.items() if key.startswith("flops/")}
            flops_total += sum(flops.values())
            done = step + 1
            if not np.isfinite(step_metrics["loss"]) and not config.skip_nonfinite_steps:
                raise train.NonFiniteLossError(f"loss is {step_metrics['loss']} at step {done}; lower the learning "
                                               "rate or set skip_nonfinite_steps=True")
            generated, tokens = counts["generated"], counts["tokens"]
            values = {**{k: v for k, v in step_metrics.items() if k != "moe_load"},
                      **metrics_lib.moe_load_stats(step_metrics["moe_load"]), **flops, "flops/total": flops_total,
                      "reward": _mean(counts["correct"], config.batch_size),
                      "completion_length": generated / config.batch_size,
                      "sampling_tokens_per_second": generated / max(sample_seconds, 1e-9),
                      "tokens_per_second": tokens / max(train_seconds, 1e-9),
                      "step_seconds": time.perf_counter() - step_start}
            if "teacher_seconds" in timings:
                values["teacher_scoring_tokens_per_second"] = tokens / max(timings["teacher_seconds"], 1e-9)
            was_preempted = preempted()
            stop = was_preempted or done == config.steps
            if done % config.log_every == 0 or stop:
                writer.write(done, values)
                bar.update(done, values)
            last = values
            if config.eval_every > 0 and (done % config.eval_every == 0 or done == config.steps):
                eval_values = evaluate(d, state["params"], eval_rng)
                writer.write(done, {**eval_values, "flops/total": flops_total})
                last = {**values, **eval_values}
            if checkpointer.should_save(done) or stop:
                checkpointer.save(done, state, {"prompts": prompts.get_state(), "flops_total": flops_total},
                                  config.to_dict())
            if was_preempted:
                if is_main:
                    print(f"preempted: saved step {done}; rerun the same command to resume", flush=True)
                break
    finally:
        checkpointer.wait()
        checkpointer.close()
        bar.close()
        writer.close()
    if "eval/accuracy" in last and is_main:
        if before is not None:
            _print_eval("before", before)
        _print_eval("after", last)
    return last
