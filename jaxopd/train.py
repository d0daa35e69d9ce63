"""`python -m jaxopd.train --config=<name or file> [--config.key=value ...]`: runs (or resumes) the training that a
run config describes, writing checkpoints, metrics.jsonl, TensorBoard events and config.json to `config.workdir`.
Running the same command again with the same workdir resumes.

`train(config)` is the same from Python. OBJECTIVES, below, is the one table of `config.loss` values: the objective
the train step optimizes, and what feeds the one loop (jaxopd/training/loop.py) its batches and evals.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
import ml_collections

from jaxopd.bundled import bundled_run_configs, run_config_summary
from jaxopd.configdict import config_dict_of, from_config_dict
from jaxopd.distill import objectives as distill_objectives, source as distill_source
from jaxopd.training import config as config_lib, init_from, sharding
from jaxopd.training.config import ConfigError, DistributedConfig, RunConfig
from jaxopd.training.loop import BatchSource, Evaluator, RunStopped, run_loop
from jaxopd.training.objectives import CROSS_ENTROPY, Objective
from jaxopd.training.pretraining import PretrainingEvaluator, PretrainingSource
from jaxopd.training.state import Run, build
from jaxopd.training.workdir_lock import WorkdirLockedError


def _pretraining(config: RunConfig, run: Run) -> tuple[BatchSource, Evaluator]:
    return PretrainingSource(config, run), PretrainingEvaluator(config, run)


def _distillation(config: RunConfig, run: Run) -> tuple[BatchSource, Evaluator]:
    distiller = distill_source.build(config, run)
    return distill_source.RolloutSource(distiller), distill_source.DistillEvaluator(distiller)


@dataclasses.dataclass(frozen=True)
class Recipe:
    objective: Objective
    feed: Callable[[RunConfig, Run], tuple[BatchSource, Evaluator]]  # the batch source and evaluator


OBJECTIVES: dict[str, Recipe] = {
    "ce": Recipe(CROSS_ENTROPY, _pretraining),  # next-token CE (+ MTP, z-loss, MoE balance) on the grain pipeline
    "reverse_kl": Recipe(distill_objectives.REVERSE_KL, _distillation),  # OPD: sampled per-token reverse KL
    "grpo": Recipe(distill_objectives.GRPO, _distillation),  # sparse task reward, group-normalized
    "teacher_sft": Recipe(CROSS_ENTROPY, _distillation),  # off-policy: next-token CE on teacher samples
    "full_reverse_kl": Recipe(distill_objectives.FULL_REVERSE_KL, _distillation),  # exact divergences (GKD)
    "forward_kl": Recipe(distill_objectives.FORWARD_KL, _distillation),
    "jsd": Recipe(distill_objectives.JSD, _distillation),
    "topk_forward_kl": Recipe(distill_objectives.TOPK_FORWARD_KL, _distillation),  # over the teacher's top-k + tail
    "topk_reverse_kl": Recipe(distill_objectives.TOPK_REVERSE_KL, _distillation),
}


def train(config: ml_collections.ConfigDict | RunConfig) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config`; returns the last logged metrics (eval ones included).
    Raises ConfigError listing every problem of the config before anything is built, WorkdirLockedError when another
    run holds the workdir, and RunStopped (NonFiniteLossError, WriteFailedError) when the run cannot go on."""
    if isinstance(config, RunConfig):
        config = config_dict_of(RunConfig, config)
    problems: list[str] = []
    distributed = from_config_dict(DistributedConfig, config.get("distributed", {}), problems, "config.distributed")
    if problems:
        raise ConfigError(problems)
    sharding.initialize_distributed(distributed)  # before the checks that depend on the process count
    config = init_from.resolve(config)  # the architecture and tokenizers the checkpoints hold
    run_config = config_lib.to_run_config(config, process_count=jax.process_count())
    recipe = OBJECTIVES[run_config.objective.loss]
    run = build(run_config, recipe.objective)
    source, evaluator = recipe.feed(run_config, run)
    return run_loop(run_config, run, recipe.objective, source, evaluator)


def usage() -> str:
    """`--help`: the command, the bundled configs and the main keys with their defaults."""
    lines = [__doc__.split("\n\n")[0], "", "bundled configs (--config=<name>; or the path of your own file):"]
    for name in bundled_run_configs():
        lines.append(f"  {name:28s} {run_config_summary(name)[:240]}")
    lines += ["", "main keys, with their defaults (every key and its comment: jaxopd/training/config.py):"]
    defaults = config_lib.base_config()
    for key, value in defaults.items():
        if isinstance(value, ml_collections.ConfigDict):
            value = "{" + ", ".join(value.keys()) + "}"
        lines.append(f"  --config.{key}={value}")
    lines.append(f"  config.loss is one of: {', '.join(OBJECTIVES)}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags, logging
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        train(flags.FLAGS.config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except (RunStopped, WorkdirLockedError) as error:
        # os._exit: after a failed write, threads of orbax may never end and would hold a normal exit forever.
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def define_config_flag() -> None:
    """The absl flag `config`: the run config sys.argv's `--config=` names (default tiny_pretrain), its `--config.`
    overrides checked first, so a misspelt key is reported with close valid keys before absl parses anything; exits
    with the error on a bad config."""
    from ml_collections import config_flags

    name = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--config=")), "tiny_pretrain")
    try:  # a bundled name, a get_config() file or a saved workdir/config.json, read by the one loader
        config = config_lib.load_config_file(name)
        config_lib.check_override_keys(config, sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    sys.argv = [arg for arg in sys.argv if not arg.startswith("--config=")]  # the overrides apply to `config`
    config_flags.DEFINE_config_dict("config", config, "the run config (--config=<bundled name or path>)",
                                    lock_config=True)


def wants_help() -> bool:
    return any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in sys.argv[1:])


def run() -> None:
    """CLI entry: `--help` (exit 0), then the run config flag (define_config_flag) and the run."""
    from absl import app

    if wants_help():
        print(usage())
        sys.exit(0)
    define_config_flag()
    app.run(main)


if __name__ == "__main__":
    run()
