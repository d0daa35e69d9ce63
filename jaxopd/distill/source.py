"""The batch source and evaluator of on-policy distillation and its baselines, for the one loop
(jaxopd/training/loop.py): prompts -> rollouts -> teacher scores -> the train step's batch.

Per step: `batch_size / group_size` prompts from the grain prompt stream, `group_size` samples each from the student
(the policy-gradient losses and the full divergences) or from the teacher ("teacher_sft"); the teacher scores the
student's tokens in one forward pass; rewards come from the task's checker. The evaluator: greedy task accuracy and
the exact per-token reverse KL KL(student || teacher) on student samples of held-out prompts.

On several processes (jax.distributed) each process takes an equal contiguous share of every step's prompts (and of
the held-out prompts); its rows join the others' in global arrays, in process order, for the sampler, the teacher
and the step, so a run computes the same as one process with the same devices. Texts, rewards and FLOP counts are
per process and summed over all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxopd.bundled import resolve_path
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill import objectives, rollouts as rollouts_lib, teacher as teacher_lib
from jaxopd.distill.policy_gradient import group_normalized_advantages
from jaxopd.distill.sampling import Sampler
from jaxopd.kernels import losses
from jaxopd.model import unembedding
from jaxopd.tasks import arithmetic
from jaxopd.training import sharding
from jaxopd.training.config import RunConfig
from jaxopd.training.state import Run

TASK_CHECKERS: dict[str, Callable[[str, str], bool]] = {"arithmetic": arithmetic.check}


@dataclasses.dataclass
class Distiller:
    """What the source and the evaluator share: the student's run, the teacher on the same mesh, the samplers and
    the jitted scoring functions."""

    config: RunConfig
    run: Run
    tokenizer: Any
    teacher_model: Any
    teacher_params: Any
    student_sampler: Sampler
    teacher_sampler: Sampler
    scorer: Any
    eval_kl: Any
    checker: Callable[[str, str], bool]
    train_prompts: list[str]  # every training prompt, checked, in file order
    eval_prompts: list[str]  # this process's share of the held-out prompts
    microbatches: Any  # (layout, rewards) -> the train step batch, see step_batch
    teacher_unembed: Optional[jax.Array]  # [microbatches, d_teacher, vocab] replicated, for the full divergences


def build(config: RunConfig, run: Run) -> Distiller:
    """The teacher on the student's mesh, tokenizers checked against each other, samplers, jitted scorer and eval KL."""
    distill = config.distill
    tokenizer = load_tokenizer(resolve_path(config.data.tokenizer), kind=config.data.tokenizer_kind)
    teacher_model, teacher_params = teacher_lib.load_model(resolve_path(distill.teacher), run.mesh)
    teacher_tokenizer = load_tokenizer(resolve_path(distill.teacher_tokenizer or config.data.tokenizer))
    teacher_lib.check_tokenizers(run.model.config, teacher_model.config, tokenizer, teacher_tokenizer)
    divergence = config.objective.loss in objectives.DIVERGENCES
    top_k = distill.top_k if config.objective.loss in objectives.TOPK_DIVERGENCES else 0  # teacher top-k to score
    sharding.check_batch_divisible(distill.eval_prompts_count, run.mesh, "distill.eval_prompts_count")
    row_sharding = sharding.batch_sharding(run.mesh, leading_axes=1)
    samplers = [Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id,
                        cache_dtype=distill.kv_cache_dtype, microbatch=distill.sampling_microbatch)
                for model in (run.model, teacher_model)]

    def eval_kl(student_params, params_of_teacher, layout):
        """Exact full-vocabulary KL(student || teacher) summed over the completion tokens, and their count."""
        hidden = [model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                              positions=layout["positions"], method="features").hidden
                  for model, params in ((run.model, student_params), (teacher_model, params_of_teacher))]
        per_token = losses.chunked_divergence(
            hidden[0], unembedding(student_params, run.model.config), hidden[1],
            unembedding(params_of_teacher, teacher_model.config), chunk_size=config.objective.loss_chunk_size,
            temperature=distill.temperature)
        return jnp.sum(per_token * layout["loss_mask"]), jnp.sum(layout["loss_mask"])

    micro = config.accumulation_steps

    def microbatches(layout, rewards):
        """The step's rows `[batch, ...]` with their group-normalized task advantages, as `[micro, rows, ...]`."""
        advantages = group_normalized_advantages(rewards, distill.group_size)
        layout = {**layout, "task_advantages": advantages[:, None] * layout["loss_mask"]}
        return {key: value.reshape(micro, config.microbatch_size, *value.shape[1:]) for key, value in layout.items()}

    def repeated_unembed(params):
        unembed = unembedding(params, teacher_model.config)
        return jnp.broadcast_to(unembed, (micro, *unembed.shape))

    teacher_unembed = None
    if divergence:  # a global replicated array, whatever the teacher's own sharding
        replicated = NamedSharding(run.mesh, PartitionSpec())
        teacher_unembed = jax.jit(repeated_unembed, out_shardings=replicated)(teacher_params)
    # Every prompt checked (fields, lengths) before step 1, so no prompt stops the run at the step that draws it.
    checks = dict(tokenizer=tokenizer, add_bos=config.data.add_bos, max_prompt_len=distill.max_prompt_len,
                  long_prompts=distill.long_prompts)
    train_prompts = rollouts_lib.load_prompts(distill.prompts, distill.prompt_field, key="distill.prompts", **checks)
    eval_prompts = rollouts_lib.read_prompts(distill.eval_prompts, distill.prompt_field, distill.eval_prompts_count,
                                             **checks)
    share = distill.eval_prompts_count // jax.process_count()
    eval_prompts = eval_prompts[jax.process_index() * share:(jax.process_index() + 1) * share]
    return Distiller(config, run, tokenizer, teacher_model, teacher_params, samplers[0], samplers[1],
                     teacher_lib.make_scorer(teacher_model, config.objective.loss_chunk_size, return_hidden=divergence,
                                             top_k=top_k, temperature=distill.temperature,
                                             microbatch=distill.scoring_microbatch),
                     jax.jit(eval_kl), TASK_CHECKERS[distill.task], train_prompts, eval_prompts,
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


def step_batch(d: Distiller, rollouts: rollouts_lib.Rollouts) -> tuple[dict[str, Any], dict[str, float]]:
    """The train step batch `[microbatches, rows, seq]` (global arrays) for one step's rollouts, and timing of the
    teacher pass."""
    layout = dict(rollouts.layout)
    timings = {}
    if d.config.objective.loss not in objectives.WITHOUT_TEACHER_SCORES:
        start = time.perf_counter()
        with sharding.mesh_context(d.run.mesh):
            scores = jax.block_until_ready(d.scorer(d.teacher_params, layout))
        timings["teacher_seconds"] = time.perf_counter() - start
        layout["teacher_logprobs"] = scores["logprobs"]
        if "hidden" in scores:
            layout["teacher_hidden"] = scores["hidden"]
        if "topk_ids" in scores:
            layout.update(teacher_topk_ids=scores["topk_ids"], teacher_topk_logprobs=scores["topk_logprobs"],
                          teacher_tail_logprob=scores["tail_logprob"])
    else:
        layout["teacher_logprobs"] = layout["target_sampler_logprobs"]
    rewards = sharding.global_batch({"rewards": rollouts.rewards}, d.run.mesh)["rewards"]
    with sharding.mesh_context(d.run.mesh):
        batch = d.microbatches(layout, rewards)
    if d.teacher_unembed is not None:
        batch["teacher_unembed"] = d.teacher_unembed
    return batch, timings


class RolloutSource:
    """Each step's rollouts (from the student, or from the teacher for "teacher_sft"), scored by the teacher, as the
    train step's batch; the prompt position is global, so any process count resumes it."""

    same_state_on_every_process = True

    def __init__(self, d: Distiller):
        self.d = d
        self.prompts = rollouts_lib.PromptStream(d.train_prompts, d.config.seed, jax.process_index(),
                                                 jax.process_count())
        self.rng = jax.random.key(d.config.seed)
        self.teacher_samples = d.config.objective.loss in objectives.TEACHER_SAMPLES

    def next_batch(self, step: int, state: dict[str, Any]) -> tuple[dict[str, jax.Array], dict[str, float]]:
        d, config, distill = self.d, self.d.config, self.d.config.distill
        sampler, params = (d.teacher_sampler, d.teacher_params) if self.teacher_samples else (d.student_sampler,
                                                                                                state["params"])
        sample_start = time.perf_counter()
        rollouts = _sample(d, sampler, params, self.prompts.next(config.batch_size // distill.group_size),
                           jax.random.fold_in(self.rng, step), distill.group_size, temperature=distill.temperature)
        sample_seconds = time.perf_counter() - sample_start
        batch, timings = step_batch(d, rollouts)
        # Per-row counts over this process's rows, summed over the processes.
        segment_ids = sharding.local_rows(rollouts.layout["segment_ids"])
        sampler_config = d.teacher_model.config if self.teacher_samples else d.run.model.config
        counts = sharding.process_sum({
            "flops/sampling": rollouts_lib.sampling_flops(sampler_config, rollouts.prompt_lengths,
                                                          rollouts.completion_lengths),
            "flops/teacher_scoring": rollouts_lib.sequence_flops(d.teacher_model.config, segment_ids, training=False)
            if "teacher_seconds" in timings else 0.0,
            "flops/training": rollouts_lib.sequence_flops(d.run.model.config, segment_ids, training=True),
            "correct": float(rollouts.rewards.sum()), "generated": float(rollouts.completion_lengths.sum()),
            "tokens": float(segment_ids.astype(bool).sum())})
        values = {key: value for key, value in counts.items() if key.startswith("flops/")}
        values.update(tokens=counts["tokens"], reward=_mean(counts["correct"], config.batch_size),
                      completion_length=counts["generated"] / config.batch_size,
                      sampling_tokens_per_second=counts["generated"] / max(sample_seconds, 1e-9))
        if "teacher_seconds" in timings:
            values["teacher_scoring_tokens_per_second"] = counts["tokens"] / max(timings["teacher_seconds"], 1e-9)
        return batch, values

    def get_state(self) -> Any:
        return self.prompts.get_state()

    def set_state(self, state: Any) -> None:
        self.prompts.set_state(state)


class DistillEvaluator:
    """eval/accuracy (greedy, the task's checker) and eval/reverse_kl (exact per-token KL(student || teacher) on one
    temperature-`distill.temperature` student sample per held-out prompt), the same samples at every eval; at the
    start also the teacher's greedy accuracy (eval/teacher_accuracy)."""

    headline = ("eval/accuracy", "eval/reverse_kl")

    def __init__(self, d: Distiller):
        self.d = d
        self.rng = jax.random.key(d.config.seed + 1)

    def start(self, params: Any) -> dict[str, float]:
        d = self.d
        teacher = _sample(d, d.teacher_sampler, d.teacher_params, d.eval_prompts, self.rng, 1, greedy=True)
        return {**self(params), "eval/teacher_accuracy": _accuracy(teacher, d.config.distill.eval_prompts_count)}

    def __call__(self, params: Any) -> dict[str, float]:
        d = self.d
        greedy = _sample(d, d.student_sampler, params, d.eval_prompts, self.rng, 1, greedy=True)
        sampled = _sample(d, d.student_sampler, params, d.eval_prompts, self.rng, 1,
                          temperature=d.config.distill.temperature)
        with sharding.mesh_context(d.run.mesh):
            kl_sum, count = jax.device_get(d.eval_kl(params, d.teacher_params, sampled.layout))
        return {"eval/accuracy": _accuracy(greedy, d.config.distill.eval_prompts_count),
                "eval/reverse_kl": float(kl_sum / max(count, 1.0))}
