"""Policy-gradient and advantage math on the log-probs of sampled tokens: on-policy distillation and GRPO.

Pure functions on arrays (no Flax, no configs), used by jaxopd/distill/objectives.py and source.py:
  sampled_reverse_kl_advantages(student_logprobs [B,T], teacher_logprobs [B,T], mask [B,T], coef=1.0) -> [B,T]
  policy_gradient_loss(logprobs [B,T], sampler_logprobs [B,T], advantages [B,T], mask [B,T], *, clip_epsilon=None,
      advantage_clip=None, normalize="tokens"|"sequences") -> (loss scalar, metrics dict)
  group_normalized_advantages(rewards [prompts * group_size], group_size, eps=1e-6) -> [prompts * group_size]
The log-probs come from jaxopd.kernels.losses.token_logprobs. Shapes: see jaxopd/kernels/__init__.py.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def sampled_reverse_kl_advantages(
    student_logprobs: Array, teacher_logprobs: Array, mask: Array, coef: float = 1.0
) -> Array:
    """Per-token OPD advantage -coef * (log pi_student(x_t) - log pi_teacher(x_t)), 0 where mask is 0: [batch, seq].

    With x_t sampled from the student, E[log pi_s(x_t) - log pi_t(x_t)] is exactly KL(pi_s || pi_t) at that prefix, so
    this is the one-sample estimate of the negated reverse KL (discount 0: no returns are accumulated). No gradient.
    """
    if not student_logprobs.shape == teacher_logprobs.shape == mask.shape:
        raise ValueError(
            f"sampled_reverse_kl_advantages: student_logprobs {student_logprobs.shape}, teacher_logprobs "
            f"{teacher_logprobs.shape} and mask {mask.shape} must have the same [batch, seq] shape"
        )
    advantages = -coef * (student_logprobs.astype(jnp.float32) - teacher_logprobs.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask > 0, advantages, 0.0))


def policy_gradient_loss(
    logprobs: Array,
    sampler_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: Optional[float] = None,
    advantage_clip: Optional[float] = None,
    normalize: str = "tokens",
) -> tuple[Array, dict[str, Array]]:
    """Importance-sampled policy-gradient loss, optionally PPO-clipped (Schulman et al. 2017, eq. 7).

    ratio_t = exp(logprobs_t - stop_gradient(sampler_logprobs_t)); advantages are always stop_gradient.
    Per-token objective: ratio * A, or with clip_epsilon: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).
    loss = -(masked mean of the objective), averaged over all tokens ("tokens") or per sequence then over sequences
    that have at least one token ("sequences").

    Args:
      logprobs: [batch, seq] log-probs of the sampled tokens under the policy being trained.
      sampler_logprobs: [batch, seq] log-probs under the policy that sampled them (equal on-policy: ratio = 1).
      advantages: [batch, seq]; mask: [batch, seq] (1 on completion tokens).
      advantage_clip: if set, advantages are clipped to [-advantage_clip, advantage_clip] first.
    Returns:
      (loss scalar, metrics): metrics are stop-gradient scalars ratio_mean, clip_fraction, advantage_mean,
      sampler_kl (k1 estimate of KL(sampler || policy)), token_count.
    """
    if not logprobs.shape == sampler_logprobs.shape == advantages.shape == mask.shape or logprobs.ndim != 2:
        raise ValueError(
            f"policy_gradient_loss: logprobs {logprobs.shape}, sampler_logprobs {sampler_logprobs.shape}, advantages "
            f"{advantages.shape} and mask {mask.shape} must all be the same [batch, seq] shape"
        )
    if normalize not in ("tokens", "sequences"):
        raise ValueError(f"normalize={normalize!r} must be 'tokens' or 'sequences'")
    if clip_epsilon is not None and not clip_epsilon > 0:
        raise ValueError(f"clip_epsilon={clip_epsilon!r} must be > 0 or None (no clipping)")
    if advantage_clip is not None and not advantage_clip > 0:
        raise ValueError(f"advantage_clip={advantage_clip!r} must be > 0 or None")

    mask = mask.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    if advantage_clip is not None:
        advantages = jnp.clip(advantages, -advantage_clip, advantage_clip)
    log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(sampler_logprobs.astype(jnp.float32))
    ratio = jnp.exp(log_ratio)
    objective = ratio * advantages
    clipped = jnp.zeros_like(ratio)
    if clip_epsilon is not None:
        clipped_objective = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
        clipped = (clipped_objective < objective).astype(jnp.float32)
        objective = jnp.minimum(objective, clipped_objective)

    token_count = jnp.sum(mask)
    token_mean = lambda x: jnp.sum(mask * x) / jnp.maximum(token_count, 1.0)
    if normalize == "tokens":
        loss = -token_mean(objective)
    else:
        per_sequence_count = jnp.sum(mask, axis=1)
        per_sequence = jnp.sum(mask * objective, axis=1) / jnp.maximum(per_sequence_count, 1.0)
        has_tokens = (per_sequence_count > 0).astype(jnp.float32)
        loss = -jnp.sum(per_sequence * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    metrics = {
        "ratio_mean": token_mean(ratio),
        "clip_fraction": token_mean(clipped),
        "advantage_mean": token_mean(advantages),
        "sampler_kl": token_mean(-log_ratio),
        "token_count": token_count,
    }
    return loss, jax.lax.stop_gradient(metrics)


def group_normalized_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO baseline (Shao et al. 2024, sec. 4.1.2): (r - group mean) / (group std + eps).

    rewards: [num_prompts * group_size], the group_size samples of each prompt contiguous. std is the population std
    (ddof=0). Returns the same shape, float32; broadcast it over the completion tokens for policy_gradient_loss.
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_normalized_advantages: rewards {rewards.shape} must be 1-D with a length divisible by "
            f"group_size={group_size} (samples of one prompt contiguous)"
        )
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    return (centered / (jnp.std(grouped, axis=1, keepdims=True) + eps)).reshape(-1)
