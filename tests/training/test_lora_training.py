"""LoRA runs (config.model.lora_rank > 0): a step changes the adapters alone, the optimizer state holds the adapters
alone (its bytes against a full run's), dropout draws from the state's rng, resume is exact, and init_from a base
model's checkpoint fills the base weights and leaves the adapters at their initialization."""

import math
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxopd import train
from jaxopd.model import Transformer, lora
from jaxopd.training import checkpoint, config as config_lib, sharding
from jaxopd.training.config import InitFromConfig
from jaxopd.training.objectives import CROSS_ENTROPY
from jaxopd.training.pretraining import StepBatches
from jaxopd.training.optimizer import make_optimizer
from jaxopd.training.init_from import load_initial_params
from jaxopd.training.state import abstract_state, build
from tests.test_train import _config, _metrics

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"
LORA = {"model.lora_rank": 4, "optimizer.schedule.kind": "constant"}


def _run(**overrides):
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {**LORA, **overrides}))
    return config, build(config, CROSS_ENTROPY)


def _bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def lora_run():
    return _run(**{"model.lora_dropout": 0.2})


def test_a_step_changes_the_adapters_alone_and_the_optimizer_holds_only_them(lora_run):
    config, run = lora_run
    before = jax.tree.map(np.asarray, run.state["params"])
    batch = sharding.global_batch(StepBatches(config).next(2), run.mesh, leading_axes=1)
    state, _ = run.step_fn(jax.tree.map(lambda x: x.copy(), run.state), batch)
    state, _ = run.step_fn(state, batch)  # the second step moves A too (B is zero before the first)
    adapters, base = lora.split(jax.tree.map(np.asarray, state["params"]))
    before_adapters, before_base = lora.split(before)
    jax.tree.map(np.testing.assert_array_equal, base, before_base)  # bitwise: expert biases included
    changed = jax.tree.map(lambda new, old: bool((new != old).any()), adapters, before_adapters)
    assert all(jax.tree.leaves(changed)), changed
    moments = [leaf for leaf in jax.tree.leaves(state["opt_state"]) if leaf.ndim > 0]
    assert _bytes(moments) == 2 * _bytes(adapters)  # Adam's mu and nu, for the adapters alone


def _state_bytes(model_config) -> tuple[int, int, int]:
    """(params, adapters, optimizer state) bytes of a run's state, from shapes alone (`abstract_state`)."""
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {}))
    state = nn.unbox(abstract_state(Transformer(model_config), make_optimizer(config.optimizer),
                                    np.zeros((1, 8), np.int32)))
    sizes = lambda tree: sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
    return sizes(state["params"]), sizes(lora.split(state["params"])[0]), sizes(state["opt_state"])


def test_lora_optimizer_state_is_the_adapters_moments_against_the_full_runs():
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {})).model
    full_params, _, full_optimizer = _state_bytes(config)
    lora_params, adapters, lora_optimizer = _state_bytes(config.replace(lora_rank=4))
    assert lora_params == full_params + adapters
    # Adam's two moments of every trained param plus a few step counts: all params but the balance biases (which
    # get no moments) in a full run, the adapters alone in a LoRA run.
    biases = 4 * 8 * (1 + 1)  # float32 [experts=8] in the MoE layer and the MTP block
    assert 0 <= full_optimizer - 2 * (full_params - biases) < 64
    assert 0 <= lora_optimizer - 2 * adapters < 64
    assert lora_optimizer * 5 < full_optimizer  # rank 4 on width 32: the adapters are a fifth of the model or less


SHORT = {"eval_every": 0, "unigram_entropy_batches": 0, "model.lora_rank": 4, "model.lora_dropout": 0.1}


@pytest.mark.slow
def test_resume_of_a_lora_run_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(_config(straight, steps=4, checkpoint_every=2, **SHORT))
    train.train(_config(resumed, steps=2, checkpoint_every=2, **SHORT))
    train.train(_config(resumed, steps=4, checkpoint_every=2, **SHORT))
    want, got = _metrics(straight), _metrics(resumed)
    for step in (3, 4):
        for name in ("loss", "grad_norm", "learning_rate"):
            assert got[step][name] == want[step][name], (step, name)


@pytest.mark.slow
def test_init_from_a_base_checkpoint_fills_the_base_and_leaves_the_adapters_at_init(tmp_path, lora_run):
    base_run = tmp_path / "base"
    train.train(_config(base_run, steps=1, checkpoint_every=1, eval_every=0, unigram_entropy_batches=0))
    _, run = lora_run
    loaded = load_initial_params(InitFromConfig("checkpoint", str(base_run)), run, "float32")
    fresh_adapters, fresh_base = lora.split(run.state["params"])
    # The base run's own params, read back as they were saved.
    saved = checkpoint.load_params(base_run, sharding.abstract_arrays(fresh_base, lora.split(run.shardings["params"])[1]))
    adapters, base = lora.split(loaded)
    jax.tree.map(np.testing.assert_array_equal, base, saved)
    jax.tree.map(np.testing.assert_array_equal, adapters, fresh_adapters)
    assert not np.array_equal(base["dense_layers"]["mlp"]["w_up"], fresh_base["dense_layers"]["mlp"]["w_up"])


def test_a_saved_lora_targets_list_resumes_against_the_configs_tuple():
    saved = {"model": {"lora_targets": ["attention", "mlp"]}}
    assert checkpoint.resume_differences(saved, {"model": {"lora_targets": ("attention", "mlp")}}) == {}
    assert checkpoint.resume_differences(saved, {"model": {"lora_targets": ("mlp",)}}) == {
        "model.lora_targets": (["attention", "mlp"], ["mlp"])}
