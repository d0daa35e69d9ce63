"""Long-context extension stages (DeepSeek-V3 §4.3): the stage configs hold the report's numbers (written here from
the report, not read from the configs), YaRN's attention factor is 0.1 ln s + 1, a stage starts from the previous
stage's checkpoint with the new rope scaling (and refuses a checkpoint of another architecture), carries or restarts
the AdamW moments as configured, and resumes exactly after a stop like any run."""

import json
import math

import jax
import numpy as np
import pytest

from jaxopd import train
from jaxopd.kernels.rope import RopeScaling, rope_frequencies, yarn_softmax_scale_factor
from jaxopd.model.config import CONTEXT_EXTENSION_FIELDS, architecture_fields
from jaxopd.training import checkpoint, init_from, optimizer, sharding
from jaxopd.training.config import ConfigError, load_config_file, to_run_config
from jaxopd.training.objectives import CROSS_ENTROPY
from jaxopd.training.state import build
from tests.test_train import _metrics

# DeepSeek-V3 technical report §4.3: two stages of 1000 steps, 32K rows at batch 1920 then 128K rows at batch 480,
# learning rate 7.3e-6 (the end of pretraining); YaRN with s = 40, alpha = 1, beta = 32 over the 4K pretraining
# window in both, as Hugging Face's config.json writes it (max_position_embeddings 163840).
REPORT_STAGES = {"deepseek_v3_671b_32k": dict(seq_len=32 * 1024, batch_size=1920, previous="deepseek_v3_671b_pretrain"),
                 "deepseek_v3_671b_128k": dict(seq_len=128 * 1024, batch_size=480, previous="deepseek_v3_671b_32k")}
REPORT_YARN = RopeScaling(kind="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
POD_CHIPS = 1024  # v5p-2048, as the pretraining config


@pytest.mark.parametrize("name", sorted(REPORT_STAGES))
def test_deepseek_v3_stage_configs_hold_the_report_numbers(name):
    report = REPORT_STAGES[name]
    stage = to_run_config(load_config_file(name))
    previous = to_run_config(load_config_file(report["previous"]))
    assert (stage.seq_len, stage.batch_size, stage.steps) == (report["seq_len"], report["batch_size"], 1000)
    assert stage.batch_ramp.start == 0  # a constant batch
    lr = optimizer.learning_rate_schedule(stage.optimizer.schedule)
    assert [float(lr(step)) for step in (0, 1, 500, 999)] == [pytest.approx(7.3e-6, rel=1e-6)] * 4
    assert stage.model.rope_scaling == REPORT_YARN and stage.model.max_position_embeddings == 163840
    # Started from the previous stage's run, its moments carried; the rest of the architecture is the checkpoint's.
    assert (stage.init_from.path, stage.init_from.optimizer) == (previous.workdir, "carry")
    assert stage.workdir != previous.workdir
    for field in set(architecture_fields()) - set(CONTEXT_EXTENSION_FIELDS):
        assert getattr(stage.model, field) == getattr(previous.model, field), field
    assert stage.model.attention_implementation == "blockwise" and stage.data.packing == "best_fit"
    # Whole microbatches over the pod's batch shards.
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(stage.mesh, POD_CHIPS)))
    batch_shards = math.prod(shape[axis] for axis in sharding.BATCH_AXES)
    assert stage.batch_size % stage.microbatch_size == 0 and stage.microbatch_size % batch_shards == 0
    # Each row split over the context axis into blocks no longer than a pretraining row (4K tokens a chip, as the
    # 4K stage that fits: a 128K row's 61 block inputs alone are 115 GB, more than a chip holds), and the weights and
    # moments over every chip (data=1: ZeRO-3 over fsdp x expert x context).
    assert stage.seq_len % shape["context"] == 0 and stage.seq_len // shape["context"] <= 4096
    assert shape["data"] == 1 and math.prod(shape.values()) == POD_CHIPS


def test_deepseek_v3_pretrains_with_plain_rope_over_4k():
    model = to_run_config(load_config_file("deepseek_v3_671b_pretrain")).model
    assert model.rope_scaling is None and model.max_position_embeddings == 4096


def test_yarn_attention_factor_is_the_reports_on_every_logit():
    sqrt_t = 0.1 * np.log(np.float64(40.0)) + 1.0  # §4.3: sqrt(t) = 0.1 ln s + 1
    scaling = to_run_config(load_config_file("deepseek_v3_671b_32k")).model.rope_scaling
    inv_freq, cos_sin_factor = rope_frequencies(64, 10000.0, scaling)
    # mscale = mscale_all_dim: q and k each carry sqrt(t) on all their dimensions, so the logits get t and the rotated
    # ones nothing more.
    assert cos_sin_factor == 1.0
    assert yarn_softmax_scale_factor(scaling) == pytest.approx(sqrt_t**2, rel=1e-15)
    # YaRN's by-parts interpolation (Peng et al. 2023 §3.2, in float64): pairs turning more than beta = 32 times over
    # the 4K window keep their frequency, fewer than alpha = 1 times are divided by s, a linear ramp between.
    dim, theta, window = 64, 10000.0, 4096
    pair = lambda rotations: dim * np.log(window / (2 * np.pi * rotations)) / (2 * np.log(theta))  # noqa: E731
    low, high = np.floor(pair(32.0)), np.ceil(pair(1.0))
    base = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    interpolated = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    expected = base / 40.0 * interpolated + base * (1.0 - interpolated)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    assert inv_freq[0] == np.float32(base[0]) and inv_freq[-1] == np.float32(base[-1] / 40.0)


# The small stage path at test size: tiny_long_256 -> tiny_long_2k with the model and batch cut down alike (the
# same --config overrides on both stages, so the second's architecture is the first's checkpoint's).
TINY_MODEL = {"model.num_layers": 2, "model.d_model": 32, "model.mlp_dim": 64, "model.moe_mlp_dim": 16,
              "model.q_lora_rank": 16, "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8,
              "model.qk_rope_head_dim": 8, "model.v_head_dim": 8}
TINY_RUN = {"batch_size": 8, "microbatch_size": 8, "eval_every": 0, "log_every": 1, "progress_bar": False,
            "data.eval_batches": 1, "unigram_entropy_batches": 0}
COMPARED = ("loss", "ce_loss", "mtp_loss", "grad_norm", "learning_rate", "moe_balance_loss", "moe/max_load_ratio")


def _stage(workdir, previous=None, **overrides):
    """tiny_long_2k from `previous`'s workdir, or tiny_long_256 when previous is None, at test size."""
    name, extra = ("tiny_long_256", {}) if previous is None else ("tiny_long_2k", {"init_from.path": str(previous),
                                                                                   "seq_len": 512})
    return load_config_file(name, {**TINY_MODEL, **TINY_RUN, "workdir": str(workdir), **extra, **overrides})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_long_256")
    train.train(_stage(workdir, steps=3, checkpoint_every=3))
    return workdir


def _find(tree, kind):
    return [leaf for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)) if isinstance(leaf, kind)]


def test_a_stage_takes_the_new_rope_window_and_the_rest_from_the_checkpoint(pretrained):
    model = to_run_config(init_from.resolve(_stage("unused", pretrained))).model
    assert model.rope_scaling == RopeScaling(kind="yarn", factor=8.0, original_max_position_embeddings=256,
                                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert model.max_position_embeddings == 2048 and model.attention_implementation == "blockwise"
    saved = init_from.checkpoint_model_config(pretrained, "checkpoint")
    assert saved.rope_scaling is None and saved.max_position_embeddings == 256
    assert (model.d_model, model.num_layers, model.qk_rope_head_dim) == (32, 2, 8)
    plain = to_run_config(init_from.resolve(_stage("unused", pretrained, **{"model.rope_scaling": None})))
    assert plain.model.rope_scaling is None and plain.model.max_position_embeddings == 2048


@pytest.mark.parametrize("field, value, theirs", [("num_layers", 3, 2), ("d_model", 64, 32)])
def test_a_stage_whose_checkpoint_has_another_architecture_is_refused_naming_the_field(pretrained, field, value,
                                                                                       theirs):
    with pytest.raises(ConfigError) as error:
        init_from.resolve(_stage("unused", pretrained, **{f"model.{field}": value}))
    assert error.value.problems == [
        f"model.{field}={value} contradicts the checkpoint {pretrained}, which has {field}={theirs}: the architecture "
        "comes from init_from.path; drop the setting"]


def test_carry_takes_the_previous_runs_adam_moments_and_restart_fresh_ones(pretrained, tmp_path):
    import optax

    previous_config = to_run_config(init_from.resolve(_stage(pretrained, steps=3)))
    previous = build(previous_config, CROSS_ENTROPY)
    checkpointer = checkpoint.Checkpointer(pretrained / "checkpoints", every=0, keep=3)
    resumed, _ = checkpointer.restore_latest(sharding.abstract_arrays(previous.state, previous.shardings),
                                             json.loads((pretrained / "config.json").read_text()))
    checkpointer.close()
    states = {}
    for mode in ("carry", "restart"):
        stage = to_run_config(init_from.resolve(_stage(tmp_path, pretrained, **{"init_from.optimizer": mode})))
        states[mode] = init_from.initial_state(stage.init_from, build(stage, CROSS_ENTROPY), "float32")
    carried, fresh = (_find(states[mode]["opt_state"], optax.ScaleByAdamState)[0] for mode in ("carry", "restart"))
    expected = _find(resumed["opt_state"], optax.ScaleByAdamState)[0]
    assert int(carried.count) == 3 and int(fresh.count) == 0
    for got, want, zero in zip(jax.tree.leaves((carried.mu, carried.nu)), jax.tree.leaves((expected.mu, expected.nu)),
                               jax.tree.leaves((fresh.mu, fresh.nu))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert not np.any(np.asarray(zero))
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(carried.mu))
    # The learning-rate schedule restarts with the stage's step (as its logged learning_rate does).
    assert [int(s.count) for s in _find(states["carry"]["opt_state"], optax.ScaleByScheduleState)] == [0]
    for mode in states:  # the params are the checkpoint's either way
        for got, want in zip(jax.tree.leaves(states[mode]["params"]), jax.tree.leaves(resumed["params"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_carry_is_refused_without_a_checkpoint_of_the_same_params(pretrained):
    with pytest.raises(ConfigError, match=r"init_from.optimizer='carry' needs init_from.path .* set "
                                          r"init_from.optimizer='restart'"):
        init_from.resolve(_stage("unused", **{"init_from.optimizer": "carry"}))
    with pytest.raises(ConfigError, match=r"this run trains LoRA adapters \(lora_rank=4\)"):
        init_from.resolve(_stage("unused", pretrained, **{"model.lora_rank": 4}))


@pytest.mark.slow
def test_a_stage_stopped_and_resumed_continues_exactly(pretrained, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train.train(_stage(whole, pretrained, steps=4, checkpoint_every=2))
    train.train(_stage(halves, pretrained, steps=2, checkpoint_every=2))  # stopped at step 2 ...
    assert sorted(_metrics(halves)) == [1, 2]
    train.train(_stage(halves, pretrained, steps=4, checkpoint_every=2))  # ... resumed from its own checkpoint
    expected, resumed = _metrics(whole), _metrics(halves)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert {name: resumed[step][name] for name in COMPARED} == {name: expected[step][name] for name in COMPARED}
    # The second launch went on from its own step-2 checkpoint: steps 1 and 2 were trained (and logged) once.
    logged = [json.loads(line)["step"] for line in (halves / "metrics.jsonl").read_text().splitlines()]
    assert [step for step in logged if step] == [1, 2, 3, 4]
    run = build(to_run_config(load_config_file(whole / "config.json")), CROSS_ENTROPY)
    abstract = sharding.abstract_arrays(run.state["params"], run.shardings["params"])
    for got, want in zip(jax.tree.leaves(checkpoint.load_params(halves, abstract)),
                         jax.tree.leaves(checkpoint.load_params(whole, abstract))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert json.loads((halves / "config.json").read_text())["model"]["rope_scaling"]["factor"] == 8.0
