"""What a run is made of: the mesh, the model, its state created directly in its shards, and the jitted train and eval
steps of its objective. (Its initial weights, `config.init_from`, are jaxopd/training/init_from.py.)

State is a dict {"params", "opt_state", "step", "rng"}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopd.model import Transformer, lora
from jaxopd.training import sharding
from jaxopd.training.config import RunConfig, model_config_dict, to_model_config
from jaxopd.training.objectives import Objective
from jaxopd.training.optimizer import make_optimizer
from jaxopd.training.step import make_eval_step, make_train_step


def _init_state(model: nn.Module, optimizer: optax.GradientTransformation, example_tokens: jax.Array
                ) -> Callable[[jax.Array], dict[str, Any]]:
    def init(rng):
        params = model.init(rng, example_tokens)["params"]
        trained, _ = lora.partition(model.config, params)  # with LoRA, the optimizer holds the adapters alone
        return {"params": params, "opt_state": optimizer.init(trained), "step": jnp.int32(0),
                "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}
    return init


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, example_tokens: jax.Array
                   ) -> dict[str, Any]:
    """The train state as a tree of shape structs still boxed with logical axis names (no memory touched)."""
    return jax.eval_shape(_init_state(model, optimizer, example_tokens), jax.random.key(0))


def state_layout(model: nn.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 example_tokens: jax.Array) -> tuple[dict[str, Any], Any]:
    """(the train state as shape structs, its NamedShardings on `mesh`), without touching memory."""
    boxed = abstract_state(model, optimizer, example_tokens)
    return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh)


def jit_train_step(model: nn.Module, optimizer: optax.GradientTransformation, objective: Objective,
                   config: RunConfig, shardings: Any) -> Any:
    """The run's jitted train step: the state donated and returned in `shardings`."""
    return jax.jit(make_train_step(model, optimizer, objective, config, shardings["params"]), donate_argnums=0,
                   out_shardings=(shardings, None))


def model_from_dict(model_fields: dict[str, Any]) -> Transformer:
    """The Transformer described by a run config's `model` section (as saved in checkpoints and config.json)."""
    return Transformer(to_model_config(model_config_dict(model_fields)))


def abstract_params(model: Transformer, mesh: jax.sharding.Mesh) -> Any:
    """The model's params as shape structs carrying their NamedShardings on `mesh` (trainer's logical-axis rules)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    shardings = sharding.logical_shardings(boxed, mesh)
    return sharding.abstract_arrays(nn.meta.unbox(boxed), shardings)


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, seed: int,
                 example_tokens: jax.Array) -> tuple[dict[str, Any], Any]:
    """(state, shardings): the state initialized directly into its shards by one jit with out_shardings (no host
    ever holds the whole model)."""
    abstract, shardings = state_layout(model, optimizer, mesh, example_tokens)
    sharding.check_fits(sharding.bytes_per_device(abstract, shardings), mesh.local_devices[0])
    init = _init_state(model, optimizer, example_tokens)
    with sharding.mesh_context(mesh):
        state = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


@dataclasses.dataclass
class Run:
    """The mesh, the model, its freshly initialized sharded state, and the jitted steps: `step_fn(state, batch)`
    donates the state; batches are `[microbatches, rows, seq]` global arrays already placed on the mesh
    (`sharding.global_batch`), whose shardings the step takes as they are."""

    mesh: jax.sharding.Mesh
    model: Transformer
    state: dict[str, Any]
    shardings: dict[str, Any]
    step_fn: Any
    eval_fn: Any


def build(config: RunConfig, objective: Objective, devices: Optional[list[jax.Device]] = None) -> Run:
    """Mesh over `devices` (default all), model, optimizer, state created in its shards, jitted train/eval steps."""
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divisible(config.microbatch_size, mesh)
    sharding.check_context_divisible(config.seq_len, mesh)
    model = Transformer(config.model)
    optimizer = make_optimizer(config.optimizer)
    example = np.zeros((1, config.seq_len), np.int32)
    state, shardings = create_state(model, optimizer, mesh, config.seed, example)
    step_fn = jit_train_step(model, optimizer, objective, config, shardings)
    eval_fn = jax.jit(make_eval_step(model, objective, config))
    return Run(mesh, model, state, shardings, sharding.within_mesh(mesh, step_fn), sharding.within_mesh(mesh, eval_fn))
