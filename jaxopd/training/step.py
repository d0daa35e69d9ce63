"""The one train step, for every objective: gradient accumulation over microbatches, AdamW, the MoE balance-bias
update, the non-finite skip; and the eval step.

With LoRA (`config.model.lora_rank > 0`) the gradient is taken with respect to the adapters alone (so the backward
pass never computes a frozen weight's gradient), the optimizer state holds the adapters alone, and the base model,
MoE balance biases included, stays as it was loaded; LoRA dropout draws its masks from the state's rng.

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

from jaxopd.model import lora, update_expert_biases
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
    model_config = model.config

    def train_step(state, batch):
        totals = objective.totals(batch, config)
        trained, frozen = lora.partition(model_config, state["params"])
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(trained, microbatch, index):
            applied = model
            if model_config.lora_dropout:
                applied = _WithDropout(model, jax.random.fold_in(dropout_rng, index))
            return objective.loss(applied, lora.combine(trained, frozen), microbatch, totals, config)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, microbatch_and_index):
            grads, loss_sum, metrics_sum = carry
            (loss, metrics), step_grads = grad_fn(trained, *microbatch_and_index)
            return (_tree_add(grads, step_grads), loss_sum + loss, _tree_add(metrics_sum, metrics)), None

        zero_grads = jax.tree.map(jnp.zeros_like, trained)
        if param_shardings is not None:
            zero_grads = jax.lax.with_sharding_constraint(zero_grads, lora.partition(model_config, param_shardings)[0])
        first = jax.tree.map(lambda x: x[0], batch)
        zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, trained, first, 0)[0][1])
        indices = jnp.arange(batch["tokens"].shape[0])
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, (zero_grads, jnp.float32(0), zero_metrics),
                                                 (batch, indices))
        updates, opt_state = optimizer.update(grads, state["opt_state"], trained)
        params = lora.combine(optax.apply_updates(trained, updates), frozen)
        moe_load = metrics.pop("moe_load") / batch["tokens"].shape[0]
        if not model_config.lora_rank:  # a LoRA run keeps its base model's routing as it is
            params = update_expert_biases(params, model_config, moe_load, config.objective.moe_bias_rate)
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


class _WithDropout:
    """The model as the objectives see it in a train step with LoRA dropout: `apply` draws the masks from `rng`."""

    def __init__(self, model: nn.Module, rng: jax.Array):
        self.model, self.rng, self.config = model, rng, model.config

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.model.apply(variables, *args, rngs={"dropout": self.rng}, **kwargs)


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)
