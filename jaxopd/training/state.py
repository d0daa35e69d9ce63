"""What a run is made of: the mesh, the model, its state created directly in its shards, and the jitted train and eval
steps of its objective; and `config.init_from` (weights from a jaxopd run or a Hugging Face checkpoint).

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

from jaxopd.bundled import resolve_path
from jaxopd.model import Transformer, lora
from jaxopd.training import checkpoint, sharding
from jaxopd.training.config import InitFromConfig, RunConfig
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


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, seed: int,
                 example_tokens: jax.Array) -> tuple[dict[str, Any], Any]:
    """(state, shardings): the state initialized directly into its shards by one jit with out_shardings (no host
    ever holds the whole model)."""
    boxed = abstract_state(model, optimizer, example_tokens)
    shardings = sharding.logical_shardings(boxed, mesh)
    sharding.check_fits(sharding.bytes_per_device(nn.meta.unbox(boxed), shardings), mesh.local_devices[0])
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
    model = Transformer(config.model)
    optimizer = make_optimizer(config.optimizer)
    example = np.zeros((1, config.seq_len), np.int32)
    state, shardings = create_state(model, optimizer, mesh, config.seed, example)
    step_fn = jax.jit(make_train_step(model, optimizer, objective, config, shardings["params"]), donate_argnums=0,
                      out_shardings=(shardings, None))
    eval_fn = jax.jit(make_eval_step(model, objective, config))
    return Run(mesh, model, state, shardings, sharding.within_mesh(mesh, step_fn), sharding.within_mesh(mesh, eval_fn))


def load_initial_params(source: InitFromConfig, run: Run, param_dtype: str) -> Any:
    """The params `config.init_from` names, in the run's shardings: a jaxopd run's checkpoint, or a Hugging Face
    checkpoint (read straight into its shards; params it lacks, e.g. MTP modules transformers drops, keep their
    initialization and are listed). None when init_from.path is empty."""
    if not source.path:
        return None
    source_path = resolve_path(source.path)  # the bundled checkpoints are found from any working directory
    abstract = sharding.abstract_arrays(run.state["params"], run.shardings["params"])
    if source.kind == "checkpoint":  # the base model's checkpoint: a LoRA run's adapters keep their initialization
        adapters, base = lora.split(run.state["params"])[0], lora.split(abstract)[1]
        return lora.combine(adapters, checkpoint.load_params(source_path, base))
    from jaxopd.hf import load_hf  # the optional Hugging Face import path, only needed here

    _, loaded = load_hf(source_path, dtype=param_dtype, mesh=run.mesh, rules=sharding.LOGICAL_AXIS_RULES)
    loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    current, treedef = jax.tree_util.tree_flatten_with_path(run.state["params"])
    unknown = set(loaded) - {path for path, _ in current}
    if unknown:
        raise ValueError(f"{source.path} has params config.model does not: "
                         f"{sorted(map(jax.tree_util.keystr, unknown))[:5]}; make the model preset match the checkpoint")
    leaves = []
    for path, leaf in current:
        new = loaded.get(path, leaf)
        if new.shape != leaf.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: checkpoint shape {new.shape} != model shape {leaf.shape}")
        leaves.append(new.astype(leaf.dtype))
    missing = [jax.tree_util.keystr(path) for path, _ in current if path not in loaded]
    if missing and jax.process_index() == 0:
        print(f"init_from: {len(missing)} params not in {source.path} keep their initialization: "
              f"{lora.summarize(missing)}")
    return jax.device_put(jax.tree.unflatten(treedef, leaves), run.shardings["params"])
