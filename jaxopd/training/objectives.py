"""The objective contract of the one train step, and next-token cross-entropy (pretraining; SFT on teacher samples).

A batch is a dict of arrays `[microbatches, rows, seq]` (the Batch contract: tokens, targets, positions,
segment_ids, loss_mask, plus whatever the objective reads). The distillation objectives are in
jaxopd/distill/objectives.py; the table naming them all is jaxopd/train.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels import losses
from jaxopd.model import unembedding
from jaxopd.training.config import RunConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training loss. `totals(batch, config)` -> global normalizers over the whole step's batch `[micro, rows, seq]`;
    `loss(model, params, microbatch, totals, config)` -> (loss, metrics) for one microbatch `[rows, seq]`, already
    divided by the totals so that summing over microbatches gives the step's value (metrics are summed the same way,
    except "moe_load" which is averaged). `headline` is the metric a person watches (the progress bar's figure)."""

    totals: Callable[[Batch, RunConfig], dict[str, jax.Array]]
    loss: Callable[[nn.Module, Any, Batch, dict[str, jax.Array], RunConfig], tuple[jax.Array, Metrics]]
    headline: str


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


def _ce_totals(batch: Batch, config: RunConfig) -> dict[str, jax.Array]:
    targets = batch["targets"].reshape(-1, batch["targets"].shape[-1])
    loss_mask = batch["loss_mask"].reshape(targets.shape)
    totals = {"tokens": jnp.maximum(loss_mask.sum(), 1.0), "microbatches": jnp.float32(batch["tokens"].shape[0])}
    for depth in range(1, config.model.mtp_depth + 1):
        totals[f"mtp_tokens_{depth}"] = jnp.maximum(mtp_targets(targets, loss_mask, depth)[1].sum(), 1.0)
    return totals


def _ce_loss(model: nn.Module, params: Any, batch: Batch, totals: dict[str, jax.Array],
             config: RunConfig) -> tuple[jax.Array, Metrics]:
    """Next-token CE over loss_mask (+ z-loss, weighted inside by z_loss_weight), the mean MTP CE over depths
    weighted by mtp_weight (DeepSeek-V3 eq. 25), and the MoE sequence-wise balance loss weighted by
    moe_balance_weight (eqs. 17-20)."""
    objective = config.objective
    features = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                           positions=batch["positions"], method="features")
    w_unembed = unembedding(params, model.config)
    stats = losses.chunked_cross_entropy(features.hidden, w_unembed, batch["targets"], batch["loss_mask"],
                                         chunk_size=objective.loss_chunk_size, z_loss_weight=objective.z_loss_weight)
    ce, z = stats["loss_sum"] / totals["tokens"], stats["z_loss_sum"] / totals["tokens"]
    loss = ce + z
    metrics = {"ce_loss": ce, "z_loss": z, "accuracy": stats["correct_count"] / totals["tokens"]}
    if features.mtp_hidden:
        mtp = 0.0
        for depth, hidden in enumerate(features.mtp_hidden, start=1):
            targets, mask = mtp_targets(batch["targets"], batch["loss_mask"], depth)
            mtp_stats = losses.chunked_cross_entropy(hidden, w_unembed, targets, mask,
                                                     chunk_size=objective.loss_chunk_size)
            mtp = mtp + mtp_stats["loss_sum"] / totals[f"mtp_tokens_{depth}"]
        mtp = mtp / len(features.mtp_hidden)
        loss = loss + objective.mtp_weight * mtp
        metrics["mtp_loss"] = mtp
    balance = features.moe_balance_loss / totals["microbatches"]
    loss = loss + objective.moe_balance_weight * balance
    metrics.update(moe_balance_loss=balance, moe_load=features.moe_load)
    return loss, metrics


CROSS_ENTROPY = Objective(_ce_totals, _ce_loss, headline="ce_loss")
