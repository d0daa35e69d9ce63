"""The jitted train step: sharded state creation, objectives (chosen statically by `config.loss`), gradient
accumulation over microbatches, AdamW, and the MoE balance-bias update.

State is a dict {"params", "opt_state", "step", "rng"}. A batch is a dict of arrays `[microbatches, rows, seq]`;
each objective declares the global normalizers it needs (computed over all microbatches before the scan, so the
step's loss and gradient do not depend on how the batch is split).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxopd import sharding
from jaxopd.optim import learning_rate_schedule
from jaxopd.kernels import losses
from jaxopd.model import unembedding, update_expert_biases

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training loss. `totals(batch, config)` -> global normalizers over the whole step's batch `[micro, rows, seq]`;
    `loss(model, params, microbatch, totals, config)` -> (loss, metrics) for one microbatch `[rows, seq]`, already
    divided by the totals so that summing over microbatches gives the step's value (metrics are summed the same way,
    except "moe_load" which is averaged)."""

    totals: Callable[[Batch, ml_collections.ConfigDict], dict[str, jax.Array]]
    loss: Callable[[nn.Module, Any, Batch, dict[str, jax.Array], ml_collections.ConfigDict], tuple[jax.Array, Metrics]]


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask for the multi-token-prediction module at `depth` (1-based; DeepSeek-V3 §2.2): position i
    predicts token i+depth+1, i.e. targets[i+depth], valid only when tokens i..i+depth+1 are one document.

    targets, loss_mask: `[batch, seq]`. Returns both shifted left by `depth`, padded with 0.
    """
    shifted = jnp.pad(targets[:, depth:], ((0, 0), (0, depth)))
    mask = loss_mask
    for shift in range(1, depth + 1):
        mask = mask * jnp.pad(loss_mask[:, shift:], ((0, 0), (0, shift)))
    return shifted, mask


def _ce_totals(batch: Batch, config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    targets = batch["targets"].reshape(-1, batch["targets"].shape[-1])
    loss_mask = batch["loss_mask"].reshape(targets.shape)
    totals = {"tokens": jnp.maximum(loss_mask.sum(), 1.0), "microbatches": jnp.float32(batch["tokens"].shape[0])}
    for depth in range(1, config.model.mtp_depth + 1):
        totals[f"mtp_tokens_{depth}"] = jnp.maximum(mtp_targets(targets, loss_mask, depth)[1].sum(), 1.0)
    return totals


def _ce_loss(model: nn.Module, params: Any, batch: Batch, totals: dict[str, jax.Array],
             config: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """Next-token CE over loss_mask (+ z-loss, weighted inside by config.z_loss_weight), the mean MTP CE over depths
    weighted by config.mtp_weight (DeepSeek-V3 eq. 25), and the MoE sequence-wise balance loss weighted by
    config.moe_balance_weight (eqs. 17-20)."""
    features = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                           positions=batch["positions"], method="features")
    w_unembed = unembedding(params, model.config)
    stats = losses.chunked_cross_entropy(features.hidden, w_unembed, batch["targets"], batch["loss_mask"],
                                         chunk_size=config.loss_chunk_size, z_loss_weight=config.z_loss_weight)
    ce, z = stats["loss_sum"] / totals["tokens"], stats["z_loss_sum"] / totals["tokens"]
    loss = ce + z
    metrics = {"ce_loss": ce, "z_loss": z, "accuracy": stats["correct_count"] / totals["tokens"]}
    if features.mtp_hidden:
        mtp = 0.0
        for depth, hidden in enumerate(features.mtp_hidden, start=1):
            targets, mask = mtp_targets(batch["targets"], batch["loss_mask"], depth)
            mtp_stats = losses.chunked_cross_entropy(hidden, w_unembed, targets, mask, chunk_size=config.loss_chunk_size)
            mtp = mtp + mtp_stats["loss_sum"] / totals[f"mtp_tokens_{depth}"]
        mtp = mtp / len(features.mtp_hidden)
        loss = loss + config.mtp_weight * mtp
        metrics["mtp_loss"] = mtp
    balance = features.moe_balance_loss / totals["microbatches"]
    loss = loss + config.moe_balance_weight * balance
    metrics.update(moe_balance_loss=balance, moe_load=features.moe_load)
    return loss, metrics


OBJECTIVES: dict[str, Objective] = {"ce": Objective(_ce_totals, _ce_loss)}


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, example_tokens: jax.Array
                   ) -> dict[str, Any]:
    """The train state as a tree of shape structs still boxed with logical axis names (no memory touched)."""
    def init(rng):
        params = model.init(rng, example_tokens)["params"]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
                "rng": jax.random.key_data(rng)}
    return jax.eval_shape(init, jax.random.key(0))


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, seed: int,
                 example_tokens: jax.Array) -> tuple[dict[str, Any], Any]:
    """(state, shardings): the state initialized directly into its shards by one jit with out_shardings (no host
    ever holds the whole model)."""
    boxed = abstract_state(model, optimizer, example_tokens)
    shardings = sharding.logical_shardings(boxed, mesh)
    sharding.check_fits(sharding.bytes_per_device(nn.meta.unbox(boxed), shardings), mesh.local_devices[0])

    def init(rng):
        params = model.init(rng, example_tokens)["params"]
        state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
                 "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}
        return nn.meta.unbox(state)

    with sharding.mesh_context(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    param_shardings: Any = None) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], Metrics]]:
    """train_step(state, batch [micro, rows, seq]) -> (new state, metrics); jit it with donate_argnums=0.

    param_shardings: the params' shardings, given to the gradient accumulator so it is sharded like the params
    (never a replicated full-size buffer)."""
    objective = OBJECTIVES[config.loss]
    schedule_fn = learning_rate_schedule(config.optimizer.schedule)

    def train_step(state, batch):
        totals = objective.totals(batch, config)
        grad_fn = jax.value_and_grad(lambda p, mb: objective.loss(model, p, mb, totals, config), has_aux=True)

        def accumulate(carry, microbatch):
            grads, loss_sum, metrics_sum = carry
            (loss, metrics), step_grads = grad_fn(state["params"], microbatch)
            return (_tree_add(grads, step_grads), loss_sum + loss, _tree_add(metrics_sum, metrics)), None

        zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
        if param_shardings is not None:
            zero_grads = jax.lax.with_sharding_constraint(zero_grads, param_shardings)
        first = jax.tree.map(lambda x: x[0], batch)
        zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state["params"], first)[0][1])
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, (zero_grads, jnp.float32(0), zero_metrics), batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        moe_load = metrics.pop("moe_load") / batch["tokens"].shape[0]
        params = update_expert_biases(params, model.config, moe_load, config.moe_bias_rate)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if config.skip_nonfinite_steps:
            # Keep the old params/optimizer state on a NaN/Inf step, but still count the step.
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     {**state, "step": new_state["step"]})
        metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule_fn(state["step"]),
                       loss_tokens=totals["tokens"], moe_load=moe_load, skipped=jnp.logical_not(finite))
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, config: ml_collections.ConfigDict) -> Callable[[Any, Batch], Metrics]:
    """eval_step(params, batch [1, rows, seq]) -> the objective's metrics and "loss" for this batch, with "tokens"
    (its weight when averaging over batches)."""
    objective = OBJECTIVES[config.loss]

    def eval_step(params, batch):
        totals = objective.totals(batch, config)
        loss, metrics = objective.loss(model, params, jax.tree.map(lambda x: x[0], batch), totals, config)
        metrics.pop("moe_load", None)
        return {**metrics, "loss": loss, "tokens": totals["tokens"]}

    return eval_step


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)
