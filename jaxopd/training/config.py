"""The run configuration: frozen dataclasses that define every key, its default and its type, and the ml_collections
interface users write (`--config=<name or file>`, `--config.a.b=v`).

A config file's `get_config()` starts from `base_config()` (these dataclasses' defaults as a ConfigDict), sets a model
(`load_model_preset(name)` or `model_config_dict(fields)`) and sizes. The ConfigDict is locked, so a misspelt key fails
with the close valid keys listed. At the command-line boundary `to_run_config` turns it into a `RunConfig`, checking
every field and the rules between fields in one pass that reports every problem at once; everything below (the loop,
the jitted step, the objectives) receives the frozen `RunConfig`, never a ConfigDict. `workdir/config.json` records
the resolved ConfigDict and loads back with `load_config_file`.

Top-level keys of the ConfigDict keep their flat names (`config.loss`, `config.checkpoint_every`); the typed view
groups them (`run.objective.loss`, `run.checkpointing.checkpoint_every`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import json
import pathlib
from typing import Any, ClassVar, Iterable, Literal, Optional

import ml_collections

from jaxopd.bundled import run_config_path, split_variant
from jaxopd.configdict import check_choices, config_dict_of, from_config_dict
from jaxopd.data.pipeline import DataConfig
from jaxopd.kernels.context_parallel import CONTEXT_PARALLEL_IMPLEMENTATIONS
from jaxopd.model import load_preset
from jaxopd.model.config import ModelConfig

# config.loss: the objective of the one train step. "ce" trains on the grain pipeline's batches; the others on the
# distillation rollouts (jaxopd/distill/objectives.py). The table that maps each to its code is jaxopd/train.py.
Loss = Literal["ce", "reverse_kl", "grpo", "teacher_sft", "full_reverse_kl", "forward_kl", "jsd", "topk_forward_kl",
               "topk_reverse_kl"]
PRETRAINING_LOSSES = ("ce",)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    loss: Loss = "ce"
    loss_chunk_size: int = 512  # sequence positions per chunk of the chunked losses (bounds the [rows, chunk, vocab])
    z_loss_weight: float = 0.0
    mtp_weight: float = 0.3  # DeepSeek-V3 §4.2: lambda = 0.3 for the first 10T tokens, 0.1 after
    moe_balance_weight: float = 1e-4  # sequence-wise balance loss alpha (DeepSeek-V3 §4.2)
    moe_bias_rate: float = 1e-3  # aux-loss-free bias update speed gamma (DeepSeek-V3 §4.2)
    skip_nonfinite_steps: bool = False  # True: a NaN/Inf step leaves the state unchanged; False: stop the run
    # The guard (jaxopd/training/guard.py) stops the run, naming the last checkpoint from before the trouble, when:
    max_skipped_steps: int = 10  # with skip_nonfinite_steps, this many steps in a row are skipped
    divergence_factor: float = 50.0  # the grad norm (or a pretraining loss) passes this times its running median,
    #                                  or the grad norm is exactly 0 after non-zero ones; 0: no divergence check
    divergence_warmup_steps: int = 5  # healthy steps seen before the factor applies

    def __post_init__(self):
        check_choices(self)

    @property
    def is_distillation(self) -> bool:
        return self.loss not in PRETRAINING_LOSSES


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """kinds: "constant" (peak_lr); "warmup_cosine" (linear warmup, cosine to end_lr at decay_end); "deepseek_v3"
    (DeepSeek-V3 §4.2: warmup, constant until decay_start, cosine to end_lr at decay_end, final_lr from final_step)."""

    kind: Literal["constant", "warmup_cosine", "deepseek_v3"] = "warmup_cosine"
    peak_lr: float = 3e-4
    warmup_steps: int = 100
    decay_start: int = 100  # deepseek_v3 only; warmup_cosine decays right after the warmup
    decay_end: int = 1000
    end_lr: float = 3e-5
    final_step: int = -1  # deepseek_v3: -1 = no final phase
    final_lr: float = 0.0

    def __post_init__(self):
        check_choices(self, "optimizer.schedule")
        if self.kind == "constant":
            return
        decay_start = self.decay_start if self.kind == "deepseek_v3" else self.warmup_steps
        if not 0 <= self.warmup_steps <= decay_start <= self.decay_end:
            raise ValueError(
                f"optimizer.schedule needs 0 <= warmup_steps <= decay_start <= decay_end, got {self.warmup_steps}, "
                f"{decay_start}, {self.decay_end}")
        if self.peak_lr <= 0:
            raise ValueError(f"optimizer.schedule.peak_lr={self.peak_lr} must be positive (end_lr is a fraction of it)")
        if self.kind == "deepseek_v3" and 0 <= self.final_step < self.decay_end:
            raise ValueError(f"optimizer.schedule.final_step={self.final_step} is before decay_end={self.decay_end}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    schedule: ScheduleConfig = ScheduleConfig()


@dataclasses.dataclass(frozen=True)
class BatchRampConfig:
    start: int = 0  # 0: constant batch_size; else the batch grows from `start` to batch_size over `tokens`
    tokens: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one may be -1, meaning all the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    context: int = 1  # >1: each row's sequence split over that many devices (context parallelism)
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str = ""
    num_processes: int = -1
    process_id: int = -1
    auto_detect: bool = False


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
    """The student's initial weights; its architecture is read from there too (jaxopd/training/init_from.py)."""

    kind: Literal["auto", "checkpoint", "hf"] = "auto"  # auto: "hf" for a directory whose config.json has a model_type
    path: str = ""  # a jaxopd run workdir, its checkpoints/, or a Hugging Face directory; "" = fresh initialization
    # "restart": fresh AdamW moments; "carry": the moments (and Adam's step count) of the jaxopd checkpoint at `path`,
    # to continue its training in a new stage (the learning-rate schedule still starts at this run's step 0).
    optimizer: Literal["restart", "carry"] = "restart"

    def __post_init__(self):
        check_choices(self, "init_from")


@dataclasses.dataclass(frozen=True)
class PromptSetConfig:
    """One of `distill.sets`: its prompts, scored by its own teacher, drawn with its weight, graded by its grader."""

    prompts: str  # JSON Lines or Parquet rows, comma-separated files or globs
    eval_prompts: str = ""  # "": no eval of this set
    teacher: str = ""  # "": distill.teacher
    teacher_tokenizer: str = ""  # "": distill.teacher_tokenizer
    weight: float = 1.0  # its share of each step's prompts: weight / the sum of the sets' weights
    grader: Optional[str] = None  # None: distill.grader; "": none


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The `config.distill` block, read when `config.loss` is a distillation objective."""

    prompts: str = ""  # JSON Lines or Parquet rows (`prompt` strings or chat `messages`), comma-separated files/globs
    eval_prompts: str = ""
    prompt_field: str = "prompt"  # a row's prompt string ...
    messages_field: str = "messages"  # ... or its chat turns, rendered with the tokenizer's chat template
    prompt_as_user_turn: bool = False  # render prompt strings as the one user turn of a chat too
    template_vars: str = ""  # chat template variables as a JSON object, e.g. '{"enable_thinking": false}'
    grader: str = ""  # "": none (pure OPD); exact_match | math | regex | arithmetic | column_addition | module:function
    grader_pattern: str = ""  # grader="regex": a Python regular expression searched in the completion
    answer_field: str = "answer"  # the row field exact_match and math compare with
    # Several prompt sets, each with its own teacher, weight and grader (then prompts/eval_prompts above are unused):
    # {"math": {"prompts": ..., "teacher": ...}, "chat": {...}}; metrics per set as reverse_kl/<set> etc.
    sets: dict[str, PromptSetConfig] = dataclasses.field(default_factory=dict)
    # Score the sampler's tokens again with the student in a full forward pass, in the same row groups as the
    # teachers (as verl recomputes old log-probs): the importance ratio starts at exactly 1 and a set whose teacher
    # is the student's own checkpoint has advantages of exactly 0; one more student forward pass per step.
    recompute_logprobs: bool = False
    eval_prompts_count: int = 256  # held-out prompts per eval (greedy accuracy + reverse KL on one sample each)
    teacher: str = ""  # jaxopd checkpoint directory or Hugging Face checkpoint
    teacher_tokenizer: str = ""  # "" = a Hugging Face teacher's own, else data.tokenizer; checked against it up front
    group_size: int = 4  # samples per prompt; batch_size rollouts per step = batch_size / group_size prompts
    max_prompt_len: int = 8  # prompt tokens after templating, BOS included (prompts are left-padded to this)
    long_prompts: Literal["error", "skip"] = "error"  # a prompt over max_prompt_len: stop before step 1, or leave it out
    max_new_tokens: int = 5
    temperature: float = 1.0  # sampling temperature; 1.0 for OPD (the student's own distribution)
    kl_coef: float = 1.0  # advantage = kl_coef * (log p_teacher - log p_student) ...
    kl_baseline: bool = True  # subtract the mean OPD advantage of each set's tokens in a microbatch (unbiased)
    reward_weight: float = 0.0  # ... + reward_weight * group-normalized task reward
    clip_epsilon: Optional[float] = None  # PPO clip of the importance ratio vs the sampler (None: unclipped)
    advantage_clip: Optional[float] = None  # clip |advantage| (None: no clipping)
    normalize: Literal["tokens", "sequences"] = "tokens"  # mean over all completion tokens, or over sequences
    jsd_beta: float = 0.5  # loss="jsd": GKD's beta
    top_k: int = 32  # loss="topk_*": the teacher's top-k tokens per position (+ one tail bucket), 1..vocab_size
    # Long completions: rows per jitted sampling / teacher-scoring microbatch (0: all rows at once). Each must divide
    # batch_size (and sampling_microbatch eval_prompts_count too); sampled tokens do not depend on it.
    sampling_microbatch: int = 0
    scoring_microbatch: int = 0
    kv_cache_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # the samplers' KV cache; auto: the model's dtype
    # Continuous batching (jaxopd.distill.engine): this many decode slots, each refilled with the next prompt as soon
    # as its row stops, so long-tailed completion lengths do not leave the batch idle; 0: one static batch per call.
    # Sampled tokens do not depend on it (each row draws from its own key).
    decode_slots: int = 0
    # MTP self-speculative sampling (jaxopd.distill.speculative): the model's MTP module drafts a token per step that
    # the main model verifies; tokens stay distributed exactly as without it, and log-probs are the main model's.
    # Needs model.mtp_depth >= 1 and the static sampler (decode_slots=0).
    speculative: Literal["off", "mtp"] = "off"

    def __post_init__(self):
        check_choices(self, "distill")

    def prompt_sets(self) -> dict[str, PromptSetConfig]:
        """The sets a run draws from, each complete (teacher and grader filled in from the distill defaults): `sets`,
        or without them one set named "" of `prompts`, `eval_prompts`, `teacher` and `grader`."""
        if not self.sets:
            return {"": PromptSetConfig(self.prompts, self.eval_prompts, self.teacher, self.teacher_tokenizer, 1.0,
                                        self.grader)}
        return {name: dataclasses.replace(
            item, teacher=item.teacher or self.teacher, teacher_tokenizer=item.teacher_tokenizer or
            self.teacher_tokenizer, grader=self.grader if item.grader is None else item.grader)
            for name, item in sorted(self.sets.items())}


def prompt_quotas(weights: dict[str, float], prompts_per_step: int, multiple: int = 1) -> dict[str, int]:
    """Each set's prompts per step: `prompts_per_step` split by weight in units of `multiple` (one per process) by
    largest remainder (ties to the first name), so every step draws the same count from each set."""
    units = prompts_per_step // multiple
    total = sum(weights.values())
    exact = {name: units * weight / total for name, weight in weights.items()}
    quotas = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(weights, key=lambda name: (-(exact[name] - quotas[name]), name))
    for name in by_remainder[:units - sum(quotas.values())]:
        quotas[name] += 1
    return {name: count * multiple for name, count in quotas.items()}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run. `objective` and `checkpointing` group top-level keys of the ConfigDict (FLATTENED)."""

    FLATTENED: ClassVar[tuple[str, ...]] = ("objective", "checkpointing")

    model: ModelConfig
    workdir: str = "workdirs/run"
    steps: int = 1000
    seed: int = 0
    batch_size: int = 8  # global sequences (or rollouts) per optimizer step (the final size when batch_ramp is on)
    microbatch_size: int = 8  # sequences per forward/backward; batch_size / microbatch_size accumulation steps
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100  # 0: no eval
    progress_bar: bool = True
    unigram_entropy_batches: int = 0  # >0: log the unigram entropy of that many training microbatches at start
    data_shards: int = 0  # data pipelines per run (0: one per process); fix it to keep data order across host counts
    export_hf: str = ""  # a directory: a finished run writes its student there as a Hugging Face checkpoint
    objective: ObjectiveConfig = ObjectiveConfig()
    checkpointing: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    batch_ramp: BatchRampConfig = BatchRampConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    init_from: InitFromConfig = InitFromConfig()
    distill: DistillConfig = DistillConfig()

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.microbatch_size


class ConfigError(ValueError):
    """Every problem of a run config, one per line, each naming the key and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the run config:\n" + "\n".join(f"  - {p}" for p in problems))


def base_config() -> ml_collections.ConfigDict:
    """Every run-config key with its default (from the dataclasses above); config files start from this and set
    `model` and the sizes."""
    config = config_dict_of(RunConfig)
    config.model = ml_collections.ConfigDict()  # set by the config file: load_model_preset(name, **overrides)
    return config


def model_config_dict(fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """A ConfigDict holding every ModelConfig field (`fields` over the defaults), optional ones as typed
    placeholders so the command line can set them (`--config.model.num_kv_heads=2`).

    Saved model sections (a checkpoint's config, `workdir/config.json`) come through here, so values an older jaxopd
    wrote are translated here, once: `remat` false/true (before remat policies) is "none"/"full"."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"model fields {sorted(unknown)} are not ModelConfig fields")
    if isinstance(fields.get("remat"), bool):
        fields = {**fields, "remat": "full" if fields["remat"] else "none"}
    section = config_dict_of(ModelConfig)
    for name, value in fields.items():
        if name == "rope_scaling" and value is not None:
            section.rope_scaling.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        else:
            section[name] = value
    return section


def load_model_preset(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The model preset `name` (jaxopd.model.load_preset: a bundled name or a .py path) as a ConfigDict with every
    `ModelConfig` field, so the command line can override any of them (`--config.model.num_layers=2`)."""
    fields = {f.name: getattr(load_preset(name), f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(overrides)
    return model_config_dict(fields)


def to_model_config(model: ml_collections.ConfigDict | dict[str, Any]) -> ModelConfig:
    """The frozen ModelConfig described by a run config's `model` section (raises ConfigError)."""
    problems: list[str] = []
    result = from_config_dict(ModelConfig, model, problems, where="config.model")
    if problems:
        raise ConfigError(problems)
    return result


def to_run_config(config: ml_collections.ConfigDict | dict[str, Any], *, process_count: int = 1) -> RunConfig:
    """The typed, checked run; raises ConfigError listing every problem (field types and choices, the model, the rules
    between fields) with its fix."""
    problems: list[str] = []
    run = from_config_dict(RunConfig, config, problems)
    if run is not None:
        problems += _rule_problems(run, process_count)
    if problems:
        raise ConfigError(problems)
    return run


def _rule_problems(run: RunConfig, process_count: int) -> list[str]:
    """The rules between fields that no single field's type can say."""
    problems = []
    if run.microbatch_size <= 0 or run.batch_size % run.microbatch_size:
        problems.append(f"batch_size={run.batch_size} must be a positive multiple of microbatch_size="
                        f"{run.microbatch_size} (gradient accumulation steps = their ratio)")
    if run.steps <= 0:
        problems.append(f"steps={run.steps} must be positive")
    if run.seq_len < 2:
        problems.append(f"seq_len={run.seq_len} is too short: a row needs at least 2 tokens (one input, one target)")
    if run.log_every < 1:
        problems.append(f"log_every={run.log_every} must be at least 1")
    if run.eval_every < 0 or run.checkpointing.checkpoint_every < 0:
        problems.append(f"eval_every={run.eval_every} and checkpoint_every={run.checkpointing.checkpoint_every} "
                        "must be >= 0 (0: never)")
    if run.objective.max_skipped_steps < 1 or run.objective.divergence_warmup_steps < 1:
        problems.append(f"max_skipped_steps={run.objective.max_skipped_steps} and divergence_warmup_steps="
                        f"{run.objective.divergence_warmup_steps} must be at least 1")
    if not (run.objective.divergence_factor == 0 or run.objective.divergence_factor > 1):
        problems.append(f"divergence_factor={run.objective.divergence_factor} must be above 1 (or 0: no divergence "
                        "check)")
    if run.objective.loss_chunk_size < 1:
        problems.append(f"loss_chunk_size={run.objective.loss_chunk_size} must be at least 1")
    problems += _context_problems(run)
    if run.objective.is_distillation:
        problems += _distill_problems(run, process_count)
    return problems


def _context_problems(run: RunConfig) -> list[str]:
    """Context parallelism (mesh.context > 1) splits every row's sequence; -1 is checked once the mesh is built."""
    context, problems = run.mesh.context, []
    if context <= 1:  # -1 (the rest of the devices) is checked in build, other sizes by the mesh
        return problems
    if run.seq_len % context:
        problems.append(f"seq_len={run.seq_len} is not divisible by mesh.context={context}: each device holds "
                        f"seq_len / context tokens of a row; use a seq_len that is a multiple of {context} or change "
                        "mesh.context")
    if run.model.attention_implementation not in CONTEXT_PARALLEL_IMPLEMENTATIONS:
        problems.append(f"model.attention_implementation={run.model.attention_implementation!r} does not run "
                        f"context-parallel (mesh.context={context}): use one of {CONTEXT_PARALLEL_IMPLEMENTATIONS}")
    if run.objective.is_distillation:
        problems.append(f"mesh.context={context}: distillation samples with a KV cache, which does not run "
                        "context-parallel; use mesh.context=1")
    return problems


def _distill_problems(run: RunConfig, process_count: int) -> list[str]:
    distill, problems = run.distill, []
    if distill.group_size < 1 or run.batch_size % distill.group_size:
        problems.append(f"batch_size={run.batch_size} (rollouts per step) must be a multiple of distill.group_size="
                        f"{distill.group_size} (samples per prompt)")
    if run.batch_ramp.start:
        problems.append("batch_ramp is not supported for distillation; set batch_ramp.start=0")
    if run.seq_len != distill.max_prompt_len + distill.max_new_tokens:
        problems.append(f"seq_len={run.seq_len} must equal distill.max_prompt_len + distill.max_new_tokens = "
                        f"{distill.max_prompt_len + distill.max_new_tokens} (one row holds prompt + completion)")
    problems += _prompt_set_problems(run, process_count)
    if run.objective.loss.startswith("topk_") and not 1 <= distill.top_k <= run.model.vocab_size:
        problems.append(f"distill.top_k={distill.top_k} must lie in [1, model.vocab_size={run.model.vocab_size}] "
                        f"(teacher tokens kept per position by config.loss={run.objective.loss!r})")
    calls = {"sampling_microbatch": {"batch_size": run.batch_size, "distill.eval_prompts_count":
                                     distill.eval_prompts_count}, "scoring_microbatch": {"batch_size": run.batch_size}}
    for key, rows in calls.items():
        value = getattr(distill, key)
        if value < 0 or (value and any(count % value for count in rows.values())):
            named = " and ".join(f"{name}={count}" for name, count in rows.items())
            problems.append(f"distill.{key}={value} must be 0 (all rows in one call) or divide the rows of each "
                            f"call: {named}")
    if distill.decode_slots < 0:
        problems.append(f"distill.decode_slots={distill.decode_slots} must be >= 0 (0: static batches)")
    elif distill.decode_slots and distill.sampling_microbatch:
        problems.append(f"distill.decode_slots={distill.decode_slots} and distill.sampling_microbatch="
                        f"{distill.sampling_microbatch} both bound the rows decoded at once: set one of them to 0")
    if distill.speculative == "mtp" and run.model.mtp_depth < 1:
        problems.append(f"distill.speculative='mtp' drafts with the MTP module, but model.mtp_depth="
                        f"{run.model.mtp_depth}: set distill.speculative='off' or use a model with mtp_depth >= 1")
    if distill.speculative == "mtp" and distill.decode_slots:
        problems.append(f"distill.speculative='mtp' runs in the static sampler only, but distill.decode_slots="
                        f"{distill.decode_slots}: set one of them off (decode_slots=0 or speculative='off')")
    prompts_per_step = run.batch_size // max(distill.group_size, 1)
    if prompts_per_step % process_count or distill.eval_prompts_count % process_count:
        problems.append(f"each of the {process_count} processes samples an equal share of the prompts: batch_size / "
                        f"distill.group_size = {prompts_per_step} prompts per step and distill.eval_prompts_count="
                        f"{distill.eval_prompts_count} must both be multiples of {process_count}")
    return problems


def _prompt_set_problems(run: RunConfig, process_count: int) -> list[str]:
    distill, loss, problems = run.distill, run.objective.loss, []
    where = {name: f"distill.sets.{name}." if name else "distill." for name in distill.prompt_sets()}
    for name, item in distill.prompt_sets().items():
        for key in ("teacher", "prompts") + (() if distill.sets else ("eval_prompts",)):
            if not getattr(item, key):
                problems.append(f"{where[name]}{key} is empty: config.loss={loss!r} needs it (see "
                                "configs/tiny_distill.py)")
        if not item.weight > 0:
            problems.append(f"{where[name]}weight={item.weight} must be above 0")
        if not item.grader and (loss == "grpo" or distill.reward_weight):
            problems.append(f"{where[name]}grader is empty but config.loss={loss!r} with distill.reward_weight="
                            f"{distill.reward_weight} needs a reward: set distill.grader (exact_match, math, regex, "
                            "arithmetic, column_addition or package.module:function)")
    for name in distill.sets:
        if not name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"distill.sets.{name}: a set's name becomes a metric name suffix; use letters, digits, "
                            "'_' and '-'")
    if distill.sets and run.eval_every and not any(item.eval_prompts for item in distill.sets.values()):
        problems.append(f"eval_every={run.eval_every} but no set of distill.sets has eval_prompts: give one, or set "
                        "eval_every=0")
    teachers = {item.teacher for item in distill.prompt_sets().values()}
    if len(teachers) > 1 and loss in ("full_reverse_kl", "forward_kl", "jsd"):
        problems.append(f"config.loss={loss!r} reads one teacher's hidden states and unembedding, but distill.sets "
                        f"name {len(teachers)} teachers: use one teacher, or loss='reverse_kl'")
    prompts_per_step = run.batch_size // max(distill.group_size, 1)
    if distill.sets and not problems and prompts_per_step % process_count == 0:
        weights = {name: item.weight for name, item in distill.sets.items()}
        quotas = prompt_quotas(weights, prompts_per_step, process_count)
        for name, count in quotas.items():
            if count == 0:
                problems.append(f"distill.sets.{name}.weight={weights[name]} gives it 0 of the {prompts_per_step} "
                                "prompts per step: raise its weight or batch_size")
        rows_per_teacher: dict[str, int] = {}
        for name, item in distill.prompt_sets().items():  # each teacher scores its sets' rows in one call
            rows_per_teacher[item.teacher] = rows_per_teacher.get(item.teacher, 0) + quotas[name] * distill.group_size
        chunk = distill.scoring_microbatch
        if chunk and any(rows % chunk and rows > chunk for rows in rows_per_teacher.values()):
            problems.append(f"distill.scoring_microbatch={chunk} must divide the rows each teacher scores per step "
                            f"({sorted(rows_per_teacher.values())}, from the sets' shares of batch_size); pick a "
                            "divisor or 0")
    return problems


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted key paths of a config, nested ones included (`optimizer.schedule.peak_lr`)."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, prefix=f"{path}."))
    return keys


def check_override_keys(config: ml_collections.ConfigDict, argv: Iterable[str], flag_name: str = "config") -> None:
    """Raises ValueError for a `--config.key=...` argument whose key is not in the config, listing close valid keys.

    ml_collections would also refuse the key (the config is locked); this check runs first to say it in one line.
    """
    valid = flat_keys(config)
    prefix = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key = arg[len(prefix):].split("=", 1)[0]
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see the config file for the valid keys."
            raise ValueError(f"unknown config key {key!r} in {arg!r}: {hint}")


def load_config_file(name_or_path: str | pathlib.Path, overrides: Optional[dict[str, Any]] = None
                     ) -> ml_collections.ConfigDict:
    """The locked ConfigDict of a run config — a bundled name (`tiny_distill`), a `get_config()` file, or a saved
    `workdir/config.json` — with {"a.b": value} overrides applied. A `:variant` suffix (`opd_qwen3:gpu8`) calls
    `get_config(variant)`. The programmatic twin of `--config=... --config.a.b=v` for tests and notebooks."""
    name, variant = split_variant(str(name_or_path))
    path = run_config_path(name)
    if variant is not None:
        if path.suffix == ".json":
            raise ValueError(f"{name_or_path}: a saved config.json has no variants; drop ':{variant}'")
        get_config = _load_module(path).get_config
        if not inspect.signature(get_config).parameters:
            raise ValueError(f"{name_or_path}: {path.name} has no variants (its get_config takes no argument); drop "
                             f"':{variant}'")
        config = get_config(variant)
    elif path.suffix == ".json":
        saved = json.loads(path.read_text())
        if "task" in saved.get("distill", {}):  # written before graders: distill.task named the checker
            saved["distill"]["grader"] = saved["distill"].pop("task")
        config = ml_collections.ConfigDict(saved)
        if "model" in saved:
            config.model = model_config_dict(saved["model"])  # as a checkpoint's model section is read
    else:
        config = _load_module(path).get_config()
    config.lock()
    overrides = overrides or {}
    check_override_keys(config, [f"--config.{key}=" for key in overrides])
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (saved as workdir/config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config))
    return path


def differences_from_defaults(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of the keys outside `model` whose value differs from base_config()'s (what a run prints
    at start; the model is summarized apart)."""
    defaults = flat_values(base_config().to_dict())
    return {key: value for key, value in flat_values(config.to_dict()).items()
            if not key.startswith("model.") and defaults.get(key, object()) != value}


def flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of the leaves of a nested dict (`optimizer.schedule.peak_lr`)."""
    values = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            values.update(flat_values(value, f"{prefix}{name}."))
        else:
            values[f"{prefix}{name}"] = value
    return values


def _load_module(path: pathlib.Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_jaxopd_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
