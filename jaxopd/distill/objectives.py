"""Distillation and RL objectives for the one train step (jaxopd/training/step.py); jaxopd/train.py's table names
them for `config.loss`:

- "reverse_kl": on-policy distillation (the seed's method). Per-token advantage
  A_t = kl_coef * (log pi_teacher(x_t) - log pi_sampler(x_t)) [+ reward_weight * task advantage], discount 0, in the
  importance-sampled policy-gradient loss (ratio against the sampler's log-probs, PPO clip optional).
- "grpo": the sparse-reward RL baseline: A_t = the group-normalized final reward of the sample (Shao et al. 2024).
- "teacher_sft": off-policy distillation, next-token cross-entropy on teacher samples (the "ce" objective itself).
- "full_reverse_kl", "forward_kl", "jsd": exact full-vocabulary divergences to the teacher at every completion
  position (GKD, Agarwal et al. 2024), from the teacher's hidden states and unembedding carried in the batch.
- "topk_forward_kl", "topk_reverse_kl": the same KLs over the teacher's `distill.top_k` most likely tokens at each
  position of the student's sample plus one bucket for the rest (as TRL, verl and NeMo-RL offer), for teachers whose
  hidden states and unembedding are too large to carry: the batch holds `k` numbers per position instead.

Rollout batches follow the Batch contract (`jaxopd.distill.sampling.sequence_layout`: tokens, targets, positions,
segment_ids, loss_mask on completion targets) plus, aligned with `targets`, `target_sampler_logprobs`,
`teacher_logprobs` and `task_advantages` `[rows, seq]`; the full divergences read `teacher_hidden [rows, seq, d_t]`
and `teacher_unembed [d_t, vocab]` (repeated per microbatch), the top-k ones `teacher_topk_ids [rows, seq, k]` int32,
`teacher_topk_logprobs [rows, seq, k]` and `teacher_tail_logprob [rows, seq]` (kernels.losses.topk_logprobs at
`distill.temperature`). Config block: `config.distill`
(jaxopd/training/config.py: DistillConfig documents every key). The policy-gradient and advantage math they use is
in policy_gradient.py beside this file.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.distill import policy_gradient
from jaxopd.kernels import losses
from jaxopd.model import unembedding
from jaxopd.training.config import RunConfig
from jaxopd.training.objectives import Batch, Objective

# What each loss needs from the rollouts (read by the batch source, jaxopd/distill/source.py).
TEACHER_SAMPLES = ("teacher_sft",)  # the teacher samples the completions
WITHOUT_TEACHER_SCORES = ("teacher_sft", "grpo")  # no teacher forward pass on the completions
DIVERGENCES = {"full_reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "jsd": "jsd"}  # teacher hidden states
TOPK_DIVERGENCES = ("topk_forward_kl", "topk_reverse_kl")  # the teacher's top-k log-probs (distill.top_k)


def _totals(batch: Batch, config: RunConfig) -> dict[str, jax.Array]:
    loss_mask = batch["loss_mask"]
    sequences = (loss_mask.sum(-1) > 0).sum()
    return {"tokens": jnp.maximum(loss_mask.sum(), 1.0), "sequences": jnp.maximum(sequences, 1.0),
            "microbatches": jnp.float32(batch["tokens"].shape[0])}


def _balance_loss(features, totals, config) -> jax.Array:
    """The MoE sequence-wise balance loss, weighted as in the "ce" objective (DeepSeek-V3 eq. 17-20)."""
    return config.objective.moe_balance_weight * features.moe_balance_loss / totals["microbatches"]


def _student_features(model: nn.Module, params: Any, batch: Batch):
    return model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], method="features")


def sampled_kl(batch: Batch) -> jax.Array:
    """Per-token sampled reverse KL log pi_sampler(x_t) - log pi_teacher(x_t) on the completion, 0 elsewhere."""
    return jnp.where(batch["loss_mask"] > 0, batch["target_sampler_logprobs"] - batch["teacher_logprobs"], 0.0)


def rollout_advantages(batch: Batch, loss: str, config: RunConfig) -> jax.Array:
    """Per-token advantages `[rows, seq]` of a policy-gradient loss (no gradient)."""
    distill = config.distill
    task = batch["task_advantages"] * batch["loss_mask"]
    if loss == "grpo":
        return task
    kl = policy_gradient.sampled_reverse_kl_advantages(batch["target_sampler_logprobs"], batch["teacher_logprobs"],
                                              batch["loss_mask"], coef=distill.kl_coef)
    if distill.kl_baseline:
        # A constant baseline leaves the gradient's expectation unchanged (E[grad log pi] = 0) but removes the
        # -KL offset that every sampled token's advantage shares, which otherwise pushes down every sampled token
        # and moves mass to tokens that were not sampled. Here: the mean advantage over the microbatch's tokens of
        # the same prompt set (sets have their own teachers, so their own offsets).
        mask = batch["loss_mask"]
        if "set_index" in batch:
            sets = jax.nn.one_hot(batch["set_index"], len(distill.prompt_sets()), dtype=kl.dtype)  # [rows, sets]
            means = (sets.T @ jnp.sum(kl * mask, -1)) / jnp.maximum(sets.T @ jnp.sum(mask, -1), 1.0)
            kl = (kl - (sets @ means)[:, None]) * mask
        else:
            kl = (kl - jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)) * mask
    return kl + distill.reward_weight * task


def _policy_gradient_loss(loss_name: str):
    def loss(model, params, batch, totals, config):
        distill = config.distill
        features = _student_features(model, params, batch)
        logprobs = losses.token_logprobs(features.hidden, unembedding(params, model.config), batch["targets"],
                                         chunk_size=config.objective.loss_chunk_size, temperature=distill.temperature)
        advantages = rollout_advantages(batch, loss_name, config)
        value, metrics = policy_gradient.policy_gradient_loss(
            logprobs, batch["target_sampler_logprobs"], advantages, batch["loss_mask"],
            clip_epsilon=distill.clip_epsilon, advantage_clip=distill.advantage_clip, normalize=distill.normalize)
        # policy_gradient_loss averages over this microbatch; reweight so the microbatches sum to the step's mean.
        count = metrics.pop("token_count")
        if distill.normalize == "tokens":
            weight = count / totals["tokens"]
        else:
            weight = (batch["loss_mask"].sum(-1) > 0).sum() / totals["sequences"]
        metrics = {name: value * weight for name, value in metrics.items()}
        if loss_name == "reverse_kl":  # the "grpo" batch carries no teacher scores
            metrics["reverse_kl"] = sampled_kl(batch).sum() / totals["tokens"]
        metrics["moe_load"] = features.moe_load
        return value * weight + _balance_loss(features, totals, config), metrics
    return loss


def _full_divergence(divergence: str):
    def per_token(hidden, unembed, batch, config):
        return losses.chunked_divergence(hidden, unembed, batch["teacher_hidden"], batch["teacher_unembed"],
                                         chunk_size=config.objective.loss_chunk_size, divergence=divergence,
                                         beta=config.distill.jsd_beta, temperature=config.distill.temperature)
    return per_token


def _topk_divergence(divergence: str):
    def per_token(hidden, unembed, batch, config):
        return losses.chunked_topk_divergence(
            hidden, unembed, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_tail_logprob"],
            chunk_size=config.objective.loss_chunk_size, divergence=divergence, temperature=config.distill.temperature)
    return per_token


def _divergence_loss(name: str, per_token_divergence):
    """The masked token mean of `per_token_divergence(student hidden, student unembed, batch, config) -> [rows, seq]`,
    logged as `name`."""
    def loss(model, params, batch, totals, config):
        features = _student_features(model, params, batch)
        per_token = per_token_divergence(features.hidden, unembedding(params, model.config), batch, config)
        value = jnp.sum(per_token * batch["loss_mask"]) / totals["tokens"]
        metrics = {name: value, "reverse_kl": sampled_kl(batch).sum() / totals["tokens"],
                   "moe_load": features.moe_load}
        return value + _balance_loss(features, totals, config), metrics
    return loss


REVERSE_KL = Objective(_totals, _policy_gradient_loss("reverse_kl"), headline="reverse_kl")
GRPO = Objective(_totals, _policy_gradient_loss("grpo"), headline="reward")
FULL_REVERSE_KL = Objective(_totals, _divergence_loss("reverse_kl", _full_divergence("reverse_kl")),
                            headline="reverse_kl")
FORWARD_KL = Objective(_totals, _divergence_loss("forward_kl", _full_divergence("forward_kl")), headline="forward_kl")
JSD = Objective(_totals, _divergence_loss("jsd", _full_divergence("jsd")), headline="jsd")
TOPK_FORWARD_KL = Objective(_totals, _divergence_loss("topk_forward_kl", _topk_divergence("forward_kl")),
                            headline="topk_forward_kl")
TOPK_REVERSE_KL = Objective(_totals, _divergence_loss("topk_reverse_kl", _topk_divergence("reverse_kl")),
                            headline="topk_reverse_kl")
