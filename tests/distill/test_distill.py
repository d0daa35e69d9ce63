"""Distillation objectives through the one real train step, the teacher's tokenizer check, and a distillation run's
exact resume. References are written independently: full logits and float64 numpy, never the code under test."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd import train
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.training import loop
from jaxopd.training.config import load_config_file, to_run_config
from jaxopd.training.optimizer import make_optimizer
from jaxopd.training.step import make_train_step
from jaxopd.distill.teacher import check_tokenizers, make_scorer, save_model
from jaxopd.model import ModelConfig, Transformer, unembedding
from jaxopd.distill.sampling import Sampler, left_pad, sequence_layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tasks" / "arithmetic" / "tokenizer.json"
STUDENT = dict(vocab_size=17, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
TEACHER = dict(vocab_size=17, d_model=24, num_layers=1, num_heads=3, num_kv_heads=1, head_dim=8, mlp_dim=48)
PAD, EOS = 0, 2


def config_dict_for(loss: str, workdir="/tmp/unused", **overrides):
    fields = {f"model.{name}": value for name, value in STUDENT.items()}
    fields.update({"loss": loss, "workdir": str(workdir), "init_from.path": "", "progress_bar": False,
                   "batch_size": 16, "microbatch_size": 16, "distill.eval_prompts_count": 8,
                   "optimizer.weight_decay": 0.0, **overrides})
    return load_config_file("tiny_distill", fields)


def config_for(loss: str, workdir="/tmp/unused", **overrides):
    return to_run_config(config_dict_for(loss, workdir, **overrides))


def init(fields, seed):
    model = Transformer(ModelConfig(**fields))
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


def rollout_batch(model, params, teacher_model, teacher_params, seed=0):
    """Real rollouts of `model` on arithmetic prompts, scored by the teacher, as a one-microbatch step batch."""
    tokenizer = load_tokenizer(TOKENIZER)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in ("12+5=", "7+80=", "300+41=", "9+9=")] * 2
    padded, lengths = left_pad(prompts, 10, PAD)
    out = Sampler(model, 10, 5, (EOS,), PAD)(params, padded, lengths, jax.random.key(seed))
    layout = sequence_layout(jnp.asarray(padded), jnp.asarray(lengths), out)
    scores = make_scorer(teacher_model, 8, return_hidden=True)(teacher_params, layout)
    layout.update(teacher_logprobs=scores["logprobs"], teacher_hidden=scores["hidden"],
                  task_advantages=jnp.zeros_like(layout["loss_mask"]))
    return layout


def one_step(config, model, params, layout):
    optimizer = make_optimizer(config.optimizer)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
             "rng": jax.random.key_data(jax.random.key(0))}
    batch = jax.tree.map(lambda x: x[None], layout)
    objective = train.OBJECTIVES[config.objective.loss].objective
    return jax.jit(make_train_step(model, optimizer, objective, config))(state, batch)


def test_teacher_equal_to_student_gives_zero_advantages_and_zero_gradient():
    config = config_for("reverse_kl")
    model, params = init(STUDENT, 0)
    layout = rollout_batch(model, params, model, params)
    mask = np.asarray(layout["loss_mask"]) > 0
    # Scored in a separate full forward, the teacher's log-probs match the sampler's to float32 rounding ...
    np.testing.assert_allclose(np.asarray(layout["teacher_logprobs"])[mask],
                               np.asarray(layout["target_sampler_logprobs"])[mask], atol=2e-5)
    new_state, metrics = one_step(config, model, params, layout)
    assert abs(float(metrics["advantage_mean"])) < 2e-5 and float(metrics["grad_norm"]) < 1e-4
    # ... and with the teacher's log-probs identical to the sampler's the advantages, gradient and update are 0.
    layout["teacher_logprobs"] = layout["target_sampler_logprobs"]
    new_state, metrics = one_step(config, model, params, layout)
    assert float(metrics["advantage_mean"]) == 0.0 and float(metrics["reverse_kl"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0
    jax.tree.map(lambda new, old: np.testing.assert_array_equal(np.asarray(new), np.asarray(old)),
                 new_state["params"], params)


def _reference_logprobs(model, params, layout):
    logits = model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                         positions=layout["positions"])
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), layout["targets"][..., None], -1)[..., 0]


@pytest.mark.parametrize("loss,baseline", [("reverse_kl", False), ("reverse_kl", True), ("grpo", False)])
def test_policy_gradient_is_the_advantage_weighted_score_function(loss, baseline):
    config = config_for(loss, **{"distill.kl_coef": 0.5, "distill.reward_weight": 0.25,
                                 "distill.kl_baseline": baseline})
    model, params = init(STUDENT, 1)
    teacher_model, teacher_params = init(TEACHER, 2)
    layout = rollout_batch(model, params, teacher_model, teacher_params)
    mask = layout["loss_mask"]
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=(mask.shape[0], 1)), jnp.float32)
    layout["task_advantages"] = rewards * mask  # one value per sample, on its completion tokens
    objective = train.OBJECTIVES[loss].objective
    totals = objective.totals(jax.tree.map(lambda x: x[None], layout), config)
    grads = jax.grad(lambda p: objective.loss(model, p, layout, totals, config)[0])(params)
    if loss == "reverse_kl":  # per-token OPD advantage (minus its token mean) plus the weighted task reward
        opd = np.asarray(0.5 * (layout["teacher_logprobs"] - layout["target_sampler_logprobs"]) * mask, np.float64)
        if baseline:
            opd = opd - opd.sum() / np.asarray(mask).sum()
        advantages = (jnp.asarray(opd, jnp.float32) + 0.25 * rewards) * mask
    else:  # sparse reward only
        advantages = rewards * mask

    def reference(p):  # on-policy the ratio is 1 and its gradient is grad log pi: REINFORCE with per-token A_t
        return -jnp.sum(advantages * _reference_logprobs(model, p, layout)) / jnp.sum(mask)

    expected = jax.grad(reference)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, expected)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 1e-4  # a gradient that is not 0


@pytest.mark.parametrize("loss", ["full_reverse_kl", "forward_kl", "jsd"])
def test_full_vocabulary_divergences_match_float64_numpy(loss):
    config = config_for(loss, **{"distill.jsd_beta": 0.3})
    model, params = init(STUDENT, 3)
    teacher_model, teacher_params = init(TEACHER, 4)
    layout = rollout_batch(model, params, teacher_model, teacher_params)
    layout["teacher_unembed"] = unembedding(teacher_params, teacher_model.config)
    objective = train.OBJECTIVES[loss].objective
    value = objective.loss(model, params, layout, objective.totals(jax.tree.map(lambda x: x[None], layout), config),
                           config)[0]

    def log_probs(m, p):
        logits = np.asarray(m.apply({"params": p}, layout["tokens"], segment_ids=layout["segment_ids"],
                                    positions=layout["positions"]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    log_s, log_t = log_probs(model, params), log_probs(teacher_model, teacher_params)
    kl = lambda log_p, log_q: (np.exp(log_p) * (log_p - log_q)).sum(-1)
    if loss == "full_reverse_kl":
        per_token = kl(log_s, log_t)
    elif loss == "forward_kl":
        per_token = kl(log_t, log_s)
    else:  # GKD eq. 1 with beta = 0.3: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s
        log_m = np.log(0.3 * np.exp(log_t) + 0.7 * np.exp(log_s))
        per_token = 0.3 * kl(log_t, log_m) + 0.7 * kl(log_s, log_m)
    mask = np.asarray(layout["loss_mask"])
    np.testing.assert_allclose(float(value), (per_token * mask).sum() / mask.sum(), rtol=1e-4)


def test_tokenizer_mismatch_is_reported_before_anything_runs():
    arithmetic = load_tokenizer(TOKENIZER)
    corpus = load_tokenizer(ROOT / "data" / "tokenizer.model")
    student = ModelConfig(**STUDENT)
    check_tokenizers(student, ModelConfig(**TEACHER), arithmetic, arithmetic)  # the same tokenizer passes
    with pytest.raises(ValueError, match="vocab_size=17 != teacher vocab_size=4096"):
        check_tokenizers(student, student.replace(vocab_size=4096), arithmetic, corpus)
    with pytest.raises(ValueError, match="tokenizer has 17 tokens, the teacher's 4096"):
        check_tokenizers(student, student, arithmetic, corpus)


def test_prompts_must_split_evenly_over_processes():
    to_run_config(config_dict_for("reverse_kl"))  # 16 rollouts / group_size 4 = 4 prompts a step, 8 eval prompts
    with pytest.raises(ValueError, match="4 prompts per step and distill.eval_prompts_count=8 must both be multiples"):
        to_run_config(config_dict_for("reverse_kl"), process_count=3)


@pytest.mark.slow
def test_distillation_resumes_exactly(tmp_path, monkeypatch, capsys):
    teacher_model, teacher_params = init(TEACHER, 5)
    save_model(tmp_path / "teacher", TEACHER, teacher_params)
    common = {"distill.teacher": str(tmp_path / "teacher"), "checkpoint_every": 2, "eval_every": 2,
              "log_every": 1, "async_checkpoints": False}
    whole = train.train(config_for("reverse_kl", tmp_path / "whole", steps=4, **common))
    train.train(config_for("reverse_kl", tmp_path / "split", steps=2, **common))
    resumed = train.train(config_for("reverse_kl", tmp_path / "split", steps=4, **common))

    def lines(name, after):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if "per_second" not in k and "seconds" not in k}
                for row in rows if row["step"] > after]

    assert lines("whole", 2) and lines("whole", 2) == lines("split", 2)
    assert whole["eval/accuracy"] == resumed["eval/accuracy"] and whole["loss"] == resumed["loss"]

    # A preemption (SIGTERM, or the multi-process sync point) after step 3, between scheduled checkpoints: the
    # run saves step 3 and stops; the rerun continues from it exactly.
    with monkeypatch.context() as patched:
        calls = iter(range(1, 100))
        patched.setattr(loop, "preemption_flag", lambda: lambda: next(calls) == 3)
        train.train(config_for("reverse_kl", tmp_path / "preempted", steps=4, **common))
    assert "preempted: saved step 3;" in capsys.readouterr().out
    assert sorted(int(step.name) for step in (tmp_path / "preempted" / "checkpoints").iterdir()) == [2, 3]
    train.train(config_for("reverse_kl", tmp_path / "preempted", steps=4, **common))
    assert lines("whole", 3) and lines("whole", 3) == lines("preempted", 3)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "flops/training" in row]
    total = sum(row["flops/sampling"] + row["flops/teacher_scoring"] + row["flops/training"] for row in steps)
    assert steps[-1]["flops/total"] == pytest.approx(total) and min(row["flops/teacher_scoring"] for row in steps) > 0


@pytest.mark.slow
def test_continuous_batching_trains_as_the_static_sampler_does(tmp_path):
    teacher_model, teacher_params = init(TEACHER, 5)
    save_model(tmp_path / "teacher", TEACHER, teacher_params)
    common = {"distill.teacher": str(tmp_path / "teacher"), "eval_every": 2, "log_every": 1, "steps": 2,
              "checkpoint_every": 0}
    static = train.train(config_for("reverse_kl", tmp_path / "static", **common))
    slots = train.train(config_for("reverse_kl", tmp_path / "slots", **common, **{"distill.decode_slots": 8}))

    def rows(name):
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if "second" not in k} for row in lines]

    assert static["eval/accuracy"] == slots["eval/accuracy"]
    for a, b in zip(rows("static"), rows("slots"), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ValueError, match="decode_slots=8 and distill.sampling_microbatch=4 both bound"):
        config_for("reverse_kl", **{"distill.decode_slots": 8, "distill.sampling_microbatch": 4})


def test_speculative_sampling_needs_an_mtp_module_and_the_static_sampler():
    with pytest.raises(ValueError, match=r"distill.speculative='mtp' .* model.mtp_depth=0"):
        config_for("reverse_kl", **{"distill.speculative": "mtp"})
    with pytest.raises(ValueError, match=r"distill.speculative='mtp' runs in the static sampler only, but "
                                         r"distill.decode_slots=8"):
        config_for("reverse_kl", **{"distill.speculative": "mtp", "distill.decode_slots": 8, "model.mtp_depth": 1})
    config = config_for("reverse_kl", **{"distill.speculative": "mtp", "model.mtp_depth": 1})
    assert config.distill.speculative == "mtp"


def test_sampled_eval_accuracy_grades_the_kl_samples_and_is_the_greedy_one_near_temperature_0(tmp_path):
    # The bundled SFT'd student: greedy accuracy well above 0, so the equality means something. Near temperature 0 its
    # samples are its greedy completions, so grading them must give the greedy accuracy.
    config = load_config_file("tiny_distill", {
        "workdir": str(tmp_path), "steps": 1, "eval_every": 1, "progress_bar": False, "batch_size": 16,
        "microbatch_size": 16, "distill.eval_prompts_count": 64, "distill.temperature": 1e-3})
    train.train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [0, 1]
    for row in evals:
        assert row["eval/sample_accuracy"] == row["eval/accuracy"] > 0.2
