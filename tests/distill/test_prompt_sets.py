"""Several prompt sets in one run, each with its own teacher, weight and grader: per-step quotas, each row scored by
its own set's teacher only (a set whose teacher is the student's own checkpoint has advantages of exactly 0), per-set
metrics, and the config errors."""

import itertools
import json

import numpy as np
import pytest

from jaxopd import train
from jaxopd.distill import objectives, source
from jaxopd.training import config as config_lib, init_from, state as state_lib

ARITHMETIC = "data/tasks/arithmetic"


def two_sets(tmp_path, **overrides):
    """tiny_distill with an addition set (the trained teacher, graded) and a subtraction set whose teacher is the
    student's own initial checkpoint (no grader)."""
    config = config_lib.load_config_file("tiny_distill", {
        "workdir": str(tmp_path / "run"), "batch_size": 32, "microbatch_size": 32, "distill.eval_prompts_count": 8,
        "progress_bar": False, "log_every": 1, "checkpoint_every": 0, "distill.recompute_logprobs": True,
        **overrides})
    with config.unlocked():
        config.distill.sets = {
            "addition": {"prompts": f"{ARITHMETIC}/train.jsonl", "eval_prompts": f"{ARITHMETIC}/eval.jsonl",
                         "teacher": f"{ARITHMETIC}/teacher", "weight": 3.0},
            "self": {"prompts": f"{ARITHMETIC}/subtraction.jsonl", "eval_prompts": f"{ARITHMETIC}/subtraction.jsonl",
                     "teacher": f"{ARITHMETIC}/student_init", "grader": ""},
        }
    return config


@pytest.mark.parametrize("weights, prompts", [((1, 1, 1), 10), ((0.7, 0.3), 8), ((5, 1, 1, 1), 16), ((1,), 3)])
def test_quotas_split_each_step_by_weight_as_closely_as_any_split(weights, prompts):
    names = [f"s{i}" for i in range(len(weights))]
    quotas = config_lib.prompt_quotas(dict(zip(names, weights)), prompts)
    assert sum(quotas.values()) == prompts
    target = np.asarray(weights) / sum(weights) * prompts
    best = min((split for split in itertools.product(range(prompts + 1), repeat=len(weights))
                if sum(split) == prompts), key=lambda split: np.abs(np.asarray(split) - target).max())
    assert np.abs(np.asarray([quotas[n] for n in names]) - target).max() == pytest.approx(
        np.abs(np.asarray(best) - target).max())
    assert config_lib.prompt_quotas({"a": 1, "b": 1}, 8, multiple=4) == {"a": 4, "b": 4}


def test_each_row_is_scored_by_its_own_sets_teacher(tmp_path):
    run_config = config_lib.to_run_config(init_from.resolve(two_sets(tmp_path)))
    run = state_lib.build(run_config, objectives.REVERSE_KL)
    params = init_from.load_initial_params(run_config.init_from, run, run_config.model.param_dtype)
    d = source.build(run_config, run)
    assert [s.name for s in d.sets] == ["addition", "self"] and [s.quota for s in d.sets] == [6, 2]
    assert len(d.teachers) == 2 and d.sets[1].grader is None
    rollout_source = source.RolloutSource(d)
    batch, values = rollout_source.next_batch(0, {"params": params})
    # The prompt streams resume exactly (the loop checkpoints get_state()).
    state = rollout_source.get_state()
    assert state == {"sets": {"addition": {"next_index": 6}, "self": {"next_index": 2}}}
    resumed = source.RolloutSource(d)
    resumed.set_state(json.loads(json.dumps(state)))
    assert [[p.text for p in s.next(4)] for s in resumed.streams] == \
        [[p.text for p in s.next(4)] for s in rollout_source.streams]
    micro = {key: np.asarray(value[0]) for key, value in batch.items()}
    sets = micro["set_index"]
    assert (sets == np.repeat([0, 1], [24, 8])).all()  # 6 and 2 prompts, 4 samples each
    advantages = np.asarray(objectives.rollout_advantages(micro, "reverse_kl", run_config))
    mask = micro["loss_mask"] > 0
    assert (advantages[sets == 1] == 0).all()  # the student's own checkpoint scores its samples exactly as it does
    assert np.abs(advantages[sets == 0][mask[sets == 0]]).min() > 0  # the trained teacher disagrees somewhere
    assert values["reverse_kl/self"] == 0.0 and values["reverse_kl/addition"] > 0.5
    assert "reward/addition" in values and "reward/self" not in values and values["grader_errors"] == 0


def test_a_two_set_run_reports_metrics_per_set(tmp_path):
    train.train(two_sets(tmp_path, steps=2, eval_every=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [row for row in rows if "eval/reverse_kl" in row]
    assert evals[0]["eval/reverse_kl/self"] < 1e-4  # exact KL to the student's own initial weights, at step 0
    assert evals[0]["eval/reverse_kl/addition"] > 1.0
    assert {"eval/accuracy/addition", "eval/teacher_accuracy/addition"} <= set(evals[0])
    assert "eval/accuracy/self" not in evals[0]
    assert any("reverse_kl/addition" in row for row in rows)


def test_bad_sets_are_config_errors_naming_the_set(tmp_path):
    config = two_sets(tmp_path, loss="grpo")
    with config.unlocked():
        config.distill.sets.self.weight = 0.0
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.to_run_config(config)
    assert "distill.sets.self.weight=0.0 must be above 0" in str(error.value)
    assert "distill.sets.self.grader is empty but config.loss='grpo'" in str(error.value)
    with pytest.raises(config_lib.ConfigError, match="reads one teacher's hidden states .* name 2 teachers"):
        config_lib.to_run_config(two_sets(tmp_path, loss="full_reverse_kl"))
    with pytest.raises(config_lib.ConfigError, match=r"distill.scoring_microbatch=16 must divide the rows each teacher "
                                                     r"scores per step \(\[8, 24\]"):
        config_lib.to_run_config(two_sets(tmp_path, **{"distill.scoring_microbatch": 16}))
    config = two_sets(tmp_path, batch_size=8, microbatch_size=8)  # 2 prompts a step
    with config.unlocked():
        config.distill.sets.self.weight = 0.01
    with pytest.raises(config_lib.ConfigError, match=r"distill.sets.self.weight=0.01 gives it 0 of the 2 prompts"):
        config_lib.to_run_config(config)
