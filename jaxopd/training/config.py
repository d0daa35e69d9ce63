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
import json
import pathlib
from typing import Any, ClassVar, Iterable, Literal, Optional

import ml_collections

from jaxopd.bundled import run_config_path
from jaxopd.configdict import check_choices, config_dict_of, from_config_dict
from jaxopd.data.pipeline import DataConfig
from jaxopd.model import load_preset
from jaxopd.model.config import ModelConfig

# config.loss: the objective of the one train step. "ce" trains on the grain pipeline's batches; the others on the
# distillation rollouts (jaxopd/distill/objectives.py). The table that maps each to its code is jaxopd/train.py.
Loss = Literal["ce", "reverse_kl", "grpo", "teacher_sft", "full_reverse_kl", "forward_kl", "jsd"]
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

    def __post_init__(self):
        check_choices(self, "init_from")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The `config.distill` block, read when `config.loss` is a distillation objective."""

    task: Literal["arithmetic"] = "arithmetic"  # the checker that scores completions (jaxopd/distill/source.py)
    prompts: str = ""  # JSON Lines, comma-separated files or globs
    eval_prompts: str = ""
    prompt_field: str = "prompt"
    eval_prompts_count: int = 256  # held-out prompts per eval (greedy accuracy + reverse KL on one sample each)
    teacher: str = ""  # jaxopd checkpoint directory or Hugging Face checkpoint
    teacher_tokenizer: str = ""  # "" = a Hugging Face teacher's own, else data.tokenizer; checked against it up front
    group_size: int = 4  # samples per prompt; batch_size rollouts per step = batch_size / group_size prompts
    max_prompt_len: int = 8  # BOS + prompt tokens (prompts are left-padded to this)
    long_prompts: Literal["error", "skip"] = "error"  # a prompt over max_prompt_len: stop before step 1, or leave it out
    max_new_tokens: int = 5
    temperature: float = 1.0  # sampling temperature; 1.0 for OPD (the student's own distribution)
    kl_coef: float = 1.0  # advantage = kl_coef * (log p_teacher - log p_student) ...
    kl_baseline: bool = True  # subtract the mean OPD advantage of the batch's tokens (variance reduction, unbiased)
    reward_weight: float = 0.0  # ... + reward_weight * group-normalized task reward
    clip_epsilon: Optional[float] = None  # PPO clip of the importance ratio vs the sampler (None: unclipped)
    advantage_clip: Optional[float] = None  # clip |advantage| (None: no clipping)
    normalize: Literal["tokens", "sequences"] = "tokens"  # mean over all completion tokens, or over sequences
    jsd_beta: float = 0.5  # loss="jsd": GKD's beta

    def __post_init__(self):
        check_choices(self, "distill")


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
    if run.objective.is_distillation:
        problems += _distill_problems(run, process_count)
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
    for key in ("teacher", "prompts", "eval_prompts"):
        if not getattr(distill, key):
            problems.append(f"distill.{key} is empty: config.loss={run.objective.loss!r} needs it (see "
                            "configs/tiny_distill.py)")
    prompts_per_step = run.batch_size // max(distill.group_size, 1)
    if prompts_per_step % process_count or distill.eval_prompts_count % process_count:
        problems.append(f"each of the {process_count} processes samples an equal share of the prompts: batch_size / "
                        f"distill.group_size = {prompts_per_step} prompts per step and distill.eval_prompts_count="
                        f"{distill.eval_prompts_count} must both be multiples of {process_count}")
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
    `workdir/config.json` — with {"a.b": value} overrides applied. The programmatic twin of
    `--config=... --config.a.b=v` for tests and notebooks."""
    path = run_config_path(str(name_or_path))
    if path.suffix == ".json":
        saved = json.loads(path.read_text())
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
