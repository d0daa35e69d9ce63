"""The batch source and evaluator of on-policy distillation and its baselines, for the one loop
(jaxopd/training/loop.py): prompts -> rollouts -> teacher scores -> the train step's batch.

Per step: `batch_size / group_size` prompts from the prompt sets' grain streams (each set a fixed share of the step,
by weight: `distill.sets`, or the one set of `distill.prompts`), `group_size` samples each from the student (the
policy-gradient losses and the divergences) or from the teacher ("teacher_sft", one teacher only); each row's tokens
are scored by its own set's teacher in one forward pass (a teacher scores exactly the rows of its sets, gathered on
the mesh); rewards come from the set's grader, if it has one. The evaluator, per set: greedy graded accuracy (sets
with a grader) and the exact per-token reverse KL KL(student || teacher) on student samples of held-out prompts.

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
from jaxopd.distill import graders, objectives, prompts as prompts_lib, rollouts as rollouts_lib
from jaxopd.distill import teacher as teacher_lib
from jaxopd.distill.policy_gradient import group_normalized_advantages
from jaxopd.distill.engine import ContinuousSampler
from jaxopd.distill.sampling import Sampler
from jaxopd.distill.speculative import SpeculativeSampler
from jaxopd.kernels import losses
from jaxopd.model import unembedding
from jaxopd.training import sharding
from jaxopd.training.config import RunConfig, prompt_quotas
from jaxopd.training.state import Run


@dataclasses.dataclass
class Teacher:
    """A teacher on the student's mesh: its model, params, sampler ("teacher_sft" and its eval accuracy), jitted
    scorer, and the jitted exact eval KL of the student to it."""

    path: str
    model: Any
    params: Any
    sampler: Sampler | ContinuousSampler
    scorer: "Scorer"
    eval_kl: Any


@dataclasses.dataclass
class PromptSet:
    """One prompt set: its checked prompts, this process's share of its held-out prompts, its teacher (an index
    into Distiller.teachers), grader (None: no reward) and prompts per step; `name` "" for the one set of
    distill.prompts (metrics without a suffix)."""

    name: str
    train: list[prompts_lib.Prompt]
    eval: list[prompts_lib.Prompt]
    teacher: int
    grader: Optional[graders.Grader]
    quota: int

    def suffix(self, key: str) -> str:
        return f"{key}/{self.name}" if self.name else key


@dataclasses.dataclass
class Distiller:
    """What the source and the evaluator share: the student's run, the teachers on the same mesh, the prompt sets,
    the student's sampler and jitted scoring functions."""

    config: RunConfig
    run: Run
    tokenizer: Any
    teachers: list[Teacher]
    sets: list[PromptSet]
    student_sampler: Sampler | ContinuousSampler
    student_scorer: "Scorer"  # distill.recompute_logprobs: the student's log-probs of its own samples
    microbatches: Any  # (layout, rewards, set_index) -> the train step batch, see step_batch
    teacher_unembed: Optional[jax.Array]  # [microbatches, d_teacher, vocab] replicated, for the full divergences

    @property
    def graded(self) -> bool:
        return any(prompt_set.grader is not None for prompt_set in self.sets)


def _sampler(config: RunConfig, model: Any, tokenizer: Any) -> Sampler | ContinuousSampler:
    distill = config.distill
    if distill.decode_slots:
        return ContinuousSampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,),
                                 tokenizer.pad_id, slots=distill.decode_slots, cache_dtype=distill.kv_cache_dtype)
    sampler_cls = SpeculativeSampler if distill.speculative == "mtp" else Sampler
    return sampler_cls(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id,
                       cache_dtype=distill.kv_cache_dtype, microbatch=distill.sampling_microbatch)


def _load_teacher(config: RunConfig, run: Run, path: str, tokenizer_path: str, tokenizer: Any, *,
                  return_hidden: bool, top_k: int) -> Teacher:
    distill = config.distill
    model, params = teacher_lib.load_model(resolve_path(path), run.mesh)
    teacher_tokenizer = load_tokenizer(resolve_path(tokenizer_path or config.data.tokenizer))
    teacher_lib.check_tokenizers(run.model.config, model.config, tokenizer, teacher_tokenizer)

    def eval_kl(student_params, params_of_teacher, layout):
        """Exact full-vocabulary KL(student || teacher) summed over the completion tokens, and their count."""
        hidden = [m.apply({"params": p}, layout["tokens"], segment_ids=layout["segment_ids"],
                          positions=layout["positions"], method="features").hidden
                  for m, p in ((run.model, student_params), (model, params_of_teacher))]
        per_token = losses.chunked_divergence(
            hidden[0], unembedding(student_params, run.model.config), hidden[1], unembedding(params_of_teacher,
                                                                                          model.config),
            chunk_size=config.objective.loss_chunk_size, temperature=distill.temperature)
        return jnp.sum(per_token * layout["loss_mask"]), jnp.sum(layout["loss_mask"])

    sampler = _sampler(config, model, tokenizer)
    scorer = Scorer.of(teacher_lib.make_scorer(model, config.objective.loss_chunk_size, return_hidden=return_hidden,
                                               top_k=top_k, temperature=distill.temperature,
                                               microbatch=distill.scoring_microbatch))
    return Teacher(path, model, params, sampler, scorer, jax.jit(eval_kl))


def build(config: RunConfig, run: Run) -> Distiller:
    """The teachers on the student's mesh (each loaded once, its tokenizer checked against the student's), the
    prompt sets read and checked, samplers and jitted scorers."""
    distill = config.distill
    tokenizer = load_tokenizer(resolve_path(config.data.tokenizer), kind=config.data.tokenizer_kind)
    divergence = config.objective.loss in objectives.DIVERGENCES
    top_k = distill.top_k if config.objective.loss in objectives.TOPK_DIVERGENCES else 0  # teacher top-k to score
    sharding.check_batch_divisible(distill.eval_prompts_count, run.mesh, "distill.eval_prompts_count")
    row_sharding = sharding.batch_sharding(run.mesh, leading_axes=1)
    configured = distill.prompt_sets()
    teachers: list[Teacher] = []
    teacher_of: dict[str, int] = {}
    for item in configured.values():
        if item.teacher not in teacher_of:
            teacher_of[item.teacher] = len(teachers)
            teachers.append(_load_teacher(config, run, item.teacher, item.teacher_tokenizer, tokenizer,
                                          return_hidden=divergence, top_k=top_k))
    # Every prompt checked (fields, templates, lengths) before step 1, so no prompt stops the run at the step that
    # draws it; every grader resolved.
    form = prompts_lib.PromptFormat(distill.prompt_field, distill.messages_field, config.data.add_bos,
                                    distill.prompt_as_user_turn, prompts_lib.parse_template_vars(distill.template_vars))
    checks = dict(tokenizer=tokenizer, form=form, max_prompt_len=distill.max_prompt_len,
                  long_prompts=distill.long_prompts)
    prompts_per_step = config.batch_size // distill.group_size
    quotas = prompt_quotas({name: item.weight for name, item in configured.items()}, prompts_per_step,
                           jax.process_count())
    share = distill.eval_prompts_count // jax.process_count()
    first = jax.process_index() * share
    sets = []
    for name, item in configured.items():
        key = f"distill.sets.{name}" if name else "distill"
        train = prompts_lib.load_prompts(item.prompts, key=f"{key}.prompts", **checks)
        held_out = prompts_lib.read_prompts(item.eval_prompts, distill.eval_prompts_count,
                                            key=f"{key}.eval_prompts", **checks) if item.eval_prompts else []
        grader = graders.build(item.grader, answer_field=distill.answer_field, pattern=distill.grader_pattern,
                               key=f"{key}.grader")
        sets.append(PromptSet(name, train, held_out[first:first + share], teacher_of[item.teacher], grader,
                              quotas[name]))

    micro = config.accumulation_steps

    def microbatches(layout, rewards, set_index):
        """The step's rows `[batch, ...]` with their group-normalized task advantages, as `[micro, rows, ...]`."""
        advantages = group_normalized_advantages(rewards, distill.group_size)
        layout = {**layout, "task_advantages": advantages[:, None] * layout["loss_mask"]}
        if len(sets) > 1:
            layout["set_index"] = set_index
        return {key: value.reshape(micro, config.microbatch_size, *value.shape[1:]) for key, value in layout.items()}

    def repeated_unembed(params):
        unembed = unembedding(params, teachers[0].model.config)
        return jnp.broadcast_to(unembed, (micro, *unembed.shape))

    teacher_unembed = None
    if divergence:  # a global replicated array, whatever the teacher's own sharding
        replicated = NamedSharding(run.mesh, PartitionSpec())
        teacher_unembed = jax.jit(repeated_unembed, out_shardings=replicated)(teachers[0].params)
    student_sampler = _sampler(config, run.model, tokenizer)
    return Distiller(config, run, tokenizer, teachers, sets, student_sampler,
                     Scorer.of(teacher_lib.make_scorer(run.model, config.objective.loss_chunk_size,
                                                       microbatch=distill.scoring_microbatch)),
                     jax.jit(microbatches, out_shardings=row_sharding), teacher_unembed)


def _sample(d: Distiller, sampler: Sampler | ContinuousSampler, params: Any, prompts: list[prompts_lib.Prompt], rng: jax.Array,
            group_size: int, **options: Any) -> rollouts_lib.Rollouts:
    with sharding.mesh_context(d.run.mesh):
        return rollouts_lib.rollout(sampler, params, d.tokenizer, prompts, rng, group_size=group_size,
                                    mesh=d.run.mesh, **options)


def _mean(total: float, count: int) -> float:
    """total / count rounded to float32, as numpy's mean of `count` float32 values summing to `total` is."""
    return float(np.float32(total) / np.float32(count))


def _rows_of(layout: dict[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
    return {key: layout[key][rows] for key in ("tokens", "targets", "positions", "segment_ids")}


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A jitted scorer `(params, layout) -> {"logprobs": [rows, seq], ...}` and its twin on a subset of the rows,
    `(params, layout, rows [n]) -> [n, ...]` (the rows gathered on the mesh inside the jitted program)."""

    all_rows: Any
    some_rows: Any

    @classmethod
    def of(cls, scorer: Any) -> "Scorer":
        return cls(scorer, jax.jit(lambda params, layout, rows: scorer(params, _rows_of(layout, rows))))


@jax.jit
def _scatter(scores: dict[str, jax.Array], part: dict[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
    return {key: scores[key].at[rows].set(value) for key, value in part.items()}


def score_by_group(groups: list[tuple[Scorer, Any, np.ndarray]], layout: dict[str, jax.Array]
                   ) -> dict[str, jax.Array]:
    """Scores `[rows, ...]` where the global rows of each (scorer, params, rows) group are scored by that scorer
    and by nothing else; one group of every row is a plain call."""
    total = layout["tokens"].shape[0]
    if len(groups) == 1 and len(groups[0][2]) == total:
        scorer, params, _ = groups[0]
        return scorer.all_rows(params, layout)
    scores = None
    for scorer, params, rows in groups:
        rows = jnp.asarray(rows, jnp.int32)
        part = scorer.some_rows(params, layout, rows)
        if scores is None:
            scores = {key: jnp.zeros((total, *value.shape[1:]), value.dtype) for key, value in part.items()}
        scores = _scatter(scores, part, rows)
    return scores


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Which set each row belongs to: `global_sets [rows]` over all processes' rows (in process order) and
    `local_sets` over this process's rows."""

    global_sets: np.ndarray
    local_sets: np.ndarray


def row_plan(counts: list[int], group_size: int) -> RowPlan:
    """Every process's rows are its equal share of each set's `counts[i]` prompts, in set order, `group_size` rows
    each (how RolloutSource and DistillEvaluator lay them out)."""
    processes = jax.process_count()
    local = np.concatenate([np.full(count // processes * group_size, index, np.int32)
                            for index, count in enumerate(counts)])
    return RowPlan(np.tile(local, processes), local)


def _teacher_groups(d: Distiller, plan: RowPlan, student_params: Any = None) -> list[tuple[Scorer, Any, np.ndarray]]:
    """(scorer, params, global rows) per teacher that has rows; with `student_params` the student's scorer on the
    same row groups instead."""
    teacher_of_row = np.asarray([d.sets[index].teacher for index in plan.global_sets])
    groups = []
    for teacher_index in sorted(set(teacher_of_row.tolist())):
        teacher = d.teachers[teacher_index]
        rows = np.flatnonzero(teacher_of_row == teacher_index)
        groups.append((d.student_scorer, student_params, rows) if student_params is not None else
                      (teacher.scorer, teacher.params, rows))
    return groups


def step_batch(d: Distiller, rollouts: rollouts_lib.Rollouts, rewards: np.ndarray, plan: RowPlan,
               student_params: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """The train step batch `[microbatches, rows, seq]` (global arrays) for one step's rollouts, each row scored by
    its set's teacher, and the timing of the teacher pass. `rewards`: this process's rows."""
    layout = dict(rollouts.layout)
    timings = {}
    if d.config.objective.loss not in objectives.WITHOUT_TEACHER_SCORES:
        start = time.perf_counter()
        with sharding.mesh_context(d.run.mesh):
            scores = jax.block_until_ready(score_by_group(_teacher_groups(d, plan), layout))
        timings["teacher_seconds"] = time.perf_counter() - start
        layout["teacher_logprobs"] = scores["logprobs"]
        if "hidden" in scores:
            layout["teacher_hidden"] = scores["hidden"]
        if "topk_ids" in scores:
            layout.update(teacher_topk_ids=scores["topk_ids"], teacher_topk_logprobs=scores["topk_logprobs"],
                          teacher_tail_logprob=scores["tail_logprob"])
    if d.config.distill.recompute_logprobs:
        with sharding.mesh_context(d.run.mesh):
            recomputed = score_by_group(_teacher_groups(d, plan, student_params), layout)["logprobs"]
            layout["target_sampler_logprobs"] = jnp.where(layout["loss_mask"] > 0, recomputed, 0.0)
    if "teacher_logprobs" not in layout:
        layout["teacher_logprobs"] = layout["target_sampler_logprobs"]
    placed = sharding.global_batch({"rewards": rewards, "set_index": plan.local_sets}, d.run.mesh)
    with sharding.mesh_context(d.run.mesh):
        batch = d.microbatches(layout, placed["rewards"], placed["set_index"])
    if d.teacher_unembed is not None:
        batch["teacher_unembed"] = d.teacher_unembed
    return batch, timings


def grade(d: Distiller, rollouts: rollouts_lib.Rollouts, local_sets: np.ndarray) -> tuple[np.ndarray, dict]:
    """Rewards of this process's rows (0 where the set has no grader), and per set: correct, graded rows, grader
    errors (with the first error's text, on this process)."""
    rewards = np.zeros(len(rollouts.completions), np.float32)
    counts = {}
    for index, prompt_set in enumerate(d.sets):
        if prompt_set.grader is None:
            continue
        rows = np.flatnonzero(local_sets == index)
        grades = graders.grade(prompt_set.grader, [rollouts.prompts[i].row for i in rows],
                               [rollouts.completions[i] for i in rows])
        rewards[rows] = grades.rewards
        counts[index] = (float(grades.rewards.sum()), float(grades.errors), grades.first_error)
    return rewards, counts


class RolloutSource:
    """Each step's rollouts (from the student, or from the teacher for "teacher_sft"), each row scored by its set's
    teacher, as the train step's batch; the prompt positions are global, so any process count resumes them."""

    same_state_on_every_process = True

    def __init__(self, d: Distiller):
        self.d = d
        # The one set of distill.prompts keeps config.seed (the same stream as before sets existed).
        self.streams = [prompts_lib.PromptStream(prompt_set.train, d.config.seed + 7919 * index, jax.process_index(),
                                                 jax.process_count()) for index, prompt_set in enumerate(d.sets)]
        self.plan = row_plan([prompt_set.quota for prompt_set in d.sets], d.config.distill.group_size)
        self.rng = jax.random.key(d.config.seed)
        self.teacher_samples = d.config.objective.loss in objectives.TEACHER_SAMPLES
        self.reported_grader_error = False

    def next_batch(self, step: int, state: dict[str, Any]) -> tuple[dict[str, jax.Array], dict[str, float]]:
        d, config, distill = self.d, self.d.config, self.d.config.distill
        sampler, params = (d.teachers[0].sampler, d.teachers[0].params) if self.teacher_samples else (
            d.student_sampler, state["params"])
        prompts = [prompt for prompt_set, stream in zip(d.sets, self.streams) for prompt in stream.next(
            prompt_set.quota)]
        sample_start = time.perf_counter()
        rollouts = _sample(d, sampler, params, prompts, jax.random.fold_in(self.rng, step), distill.group_size,
                           temperature=distill.temperature)
        sample_seconds = time.perf_counter() - sample_start
        rewards, grade_counts = grade(d, rollouts, self.plan.local_sets)
        batch, timings = step_batch(d, rollouts, rewards, self.plan, state["params"])
        # Per-row counts over this process's rows, summed over the processes.
        segment_ids = sharding.local_rows(rollouts.layout["segment_ids"])
        sampler_config = d.teachers[0].model.config if self.teacher_samples else d.run.model.config
        teacher_flops = sum(rollouts_lib.sequence_flops(d.teachers[d.sets[index].teacher].model.config,
                                                        segment_ids[self.plan.local_sets == index], training=False)
                            for index in range(len(d.sets))) if "teacher_seconds" in timings else 0.0
        totals = {
            "flops/sampling": rollouts_lib.sampling_flops(sampler_config, rollouts.prompt_lengths,
                                                          rollouts.completion_lengths),
            "flops/teacher_scoring": teacher_flops,
            "flops/training": rollouts_lib.sequence_flops(d.run.model.config, segment_ids, training=True),
            "generated": float(rollouts.completion_lengths.sum()),
            "tokens": float(segment_ids.astype(bool).sum())}
        for index, (correct, errors, _) in grade_counts.items():
            totals[f"correct/{index}"], totals[f"grader_errors/{index}"] = correct, errors
        totals.update(self._kl_sums(batch) if len(d.sets) > 1 and "teacher_seconds" in timings else {})
        counts = sharding.process_sum(totals)
        values = {key: value for key, value in counts.items() if key.startswith("flops/")}
        values.update(tokens=counts["tokens"], completion_length=counts["generated"] / config.batch_size,
                      sampling_tokens_per_second=counts["generated"] / max(sample_seconds, 1e-9))
        graded = [index for index in grade_counts]
        if graded:
            rows = sum(d.sets[index].quota for index in graded) * distill.group_size
            values["reward"] = _mean(sum(counts[f"correct/{index}"] for index in graded), rows)
            values["grader_errors"] = sum(counts[f"grader_errors/{index}"] for index in graded)
            self._report_grader_error(grade_counts)
        for index, prompt_set in enumerate(d.sets if len(d.sets) > 1 else ()):
            if index in grade_counts:
                values[prompt_set.suffix("reward")] = _mean(counts[f"correct/{index}"],
                                                            prompt_set.quota * distill.group_size)
            if f"kl_sum/{index}" in counts:
                values[prompt_set.suffix("reverse_kl")] = counts[f"kl_sum/{index}"] / max(counts[f"kl_count/{index}"],
                                                                                          1.0)
        if "teacher_seconds" in timings:
            values["teacher_scoring_tokens_per_second"] = counts["tokens"] / max(timings["teacher_seconds"], 1e-9)
        return batch, values

    def _kl_sums(self, batch: dict[str, jax.Array]) -> dict[str, float]:
        """Per set, this process's sum of the sampled reverse KL over completion tokens, and their count."""
        fields = {key: sharding.local_rows(batch[key].reshape(-1, *batch[key].shape[2:]))
                  for key in ("target_sampler_logprobs", "teacher_logprobs", "loss_mask")}
        per_row = ((fields["target_sampler_logprobs"] - fields["teacher_logprobs"]) * fields["loss_mask"]).sum(-1)
        tokens = fields["loss_mask"].sum(-1)
        sums = {}
        for index in range(len(self.d.sets)):
            rows = self.plan.local_sets == index
            sums[f"kl_sum/{index}"], sums[f"kl_count/{index}"] = float(per_row[rows].sum()), float(tokens[rows].sum())
        return sums

    def _report_grader_error(self, grade_counts: dict) -> None:
        first = next((error for _, errors, error in grade_counts.values() if error), None)
        if first and not self.reported_grader_error:
            self.reported_grader_error = True
            print(f"a grader raised (scored 0, counted in grader_errors; the run goes on): {first}", flush=True)

    def get_state(self) -> Any:
        if len(self.streams) == 1:
            return self.streams[0].get_state()
        return {"sets": {prompt_set.name: stream.get_state() for prompt_set, stream in zip(self.d.sets, self.streams)}}

    def set_state(self, state: Any) -> None:
        if len(self.streams) == 1:
            self.streams[0].set_state(state)
            return
        for prompt_set, stream in zip(self.d.sets, self.streams):
            stream.set_state(state["sets"][prompt_set.name])


class DistillEvaluator:
    """Per set with held-out prompts: eval/accuracy (greedy, the set's grader; sets without one report none),
    eval/reverse_kl (exact per-token KL(student || its teacher) on one temperature-`distill.temperature` student
    sample per held-out prompt, the same keys at every eval) and eval/sample_accuracy (those samples graded: the
    policy as OPD samples it, which can differ far from greedy); at the start also the teacher's greedy accuracy
    (eval/teacher_accuracy). With several sets each gets `/<set>` metrics and the unsuffixed ones pool them."""

    def __init__(self, d: Distiller):
        self.d = d
        self.rng = jax.random.key(d.config.seed + 1)
        self.sets = [prompt_set for prompt_set in d.sets if prompt_set.eval]
        self.headline = (("eval/accuracy",) if any(s.grader for s in self.sets) else ()) + ("eval/reverse_kl",)

    def _graded(self, key: str, rollouts_by_set: Callable[[PromptSet], Any]) -> dict[str, float]:
        """`key` (per set and pooled): the fraction of each graded set's held-out rollouts its grader scores right."""
        correct, total, values = 0.0, 0, {}
        for prompt_set in self.sets:
            if prompt_set.grader is None:
                continue
            rollouts = rollouts_by_set(prompt_set)
            grades = graders.grade(prompt_set.grader, [p.row for p in rollouts.prompts], rollouts.completions)
            right = sharding.process_sum({"correct": float(grades.rewards.sum())})["correct"]
            values[prompt_set.suffix(key)] = _mean(right, self.d.config.distill.eval_prompts_count)
            correct, total = correct + right, total + self.d.config.distill.eval_prompts_count
        if total and len(self.sets) > 1:
            values[key] = _mean(correct, total)
        return values

    def _accuracy(self, params_by_set: Callable[[PromptSet], tuple[Sampler, Any]], key: str) -> dict[str, float]:
        return self._graded(key, lambda prompt_set: _sample(self.d, *params_by_set(prompt_set), prompt_set.eval,
                                                            self.rng, 1, greedy=True))

    def start(self, params: Any) -> dict[str, float]:
        teacher = self._accuracy(lambda s: (self.d.teachers[s.teacher].sampler, self.d.teachers[s.teacher].params),
                                 "eval/teacher_accuracy")
        return {**self(params), **teacher}

    def __call__(self, params: Any) -> dict[str, float]:
        d = self.d
        values = self._accuracy(lambda s: (d.student_sampler, params), "eval/accuracy")
        kl_total, count_total, samples = 0.0, 0.0, {}
        for prompt_set in self.sets:
            teacher = d.teachers[prompt_set.teacher]
            sampled = samples[prompt_set.name] = _sample(d, d.student_sampler, params, prompt_set.eval, self.rng, 1,
                                                         temperature=d.config.distill.temperature)
            with sharding.mesh_context(d.run.mesh):
                kl_sum, count = jax.device_get(teacher.eval_kl(params, teacher.params, sampled.layout))
            values[prompt_set.suffix("eval/reverse_kl")] = float(kl_sum / max(count, 1.0))
            kl_total, count_total = kl_total + float(kl_sum), count_total + float(count)
        if len(self.sets) > 1:
            values["eval/reverse_kl"] = kl_total / max(count_total, 1.0)
        values.update(self._graded("eval/sample_accuracy", lambda prompt_set: samples[prompt_set.name]))
        return values
