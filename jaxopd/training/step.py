"""The one train step, for every objective: gradient accumulation over microbatches, AdamW, the MoE balance-bias
update, the non-finite skip; and the eval step.

State is a dict {"params", "opt_state", "step", "rng"}. A batch is a dict of arrays `[microbatches, rows, seq]`;
each objective declares the global normalizers it needs (computed over all microbatches before the scan, so the
step's loss and gradient do not depend on how the batch is split).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxopd.model import update_expert_biases
from jaxopd.training.config import RunConfig
from jaxopd.training.objectives import Batch, Metrics, Objective
from jaxopd.training.optimizer import learning_rate_schedule


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, objective: Objective,
                    config: RunConfig, param_shardings: Any = None
                    ) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], Metrics]]:
    """train_step(state, batch [micro, rows, seq]) -> (new state, metrics); jit it with donate_argnums=0.

    param_shardings: the params' shardings, given to the gradient accumulator so it is sharded like the params
    (never a replicated full-size buffer)."""
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
        params = update_expert_biases(params, model.config, moe_load, config.objective.moe_bias_rate)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if config.objective.skip_nonfinite_steps:
            # Keep the old params/optimizer state on a NaN/Inf step, but still count the step.
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     {**state, "step": new_state["step"]})
        metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule_fn(state["step"]),
                       loss_tokens=totals["tokens"], moe_load=moe_load, skipped=jnp.logical_not(finite))
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, objective: Objective, config: RunConfig) -> Callable[[Any, Batch], Metrics]:
    """eval_step(params, batch [1, rows, seq]) -> the objective's metrics and "loss" for this batch, with "tokens"
    (its weight when averaging over batches)."""

    def eval_step(params, batch):
        totals = objective.totals(batch, config)
        loss, metrics = objective.loss(model, params, jax.tree.map(lambda x: x[0], batch), totals, config)
        metrics.pop("moe_load", None)
        return {**metrics, "loss": loss, "tokens": totals["tokens"]}

    return eval_step


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)
