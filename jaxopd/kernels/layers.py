"""Small dense layers shared by every architecture: RMSNorm, the SwiGLU MLP and LoRA's low-rank update."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp


class LowRank(NamedTuple):
    """The LoRA update of one weight W (Hu et al. 2021): x -> x W + ((keep * x) a) b, never forming a b.

    a: `[in..., r]`; b: `[r, out...]`, already multiplied by the scale (alpha / r); for a stack of experts
      `[E, in, r]` and `[E, r, out]` (`jaxopd.kernels.moe`).
    keep: None, or the inverted-dropout mask of the adapter's input (0 or 1 / (1 - rate)), shaped like that input.
    """

    a: jax.Array
    b: jax.Array
    keep: Optional[jax.Array] = None


def low_rank(x: jnp.ndarray, update: Optional[LowRank]) -> jnp.ndarray | float:
    """x `[..., in...]` -> the update's output `[..., out...]` in x.dtype ((keep * x) a) b; 0.0 when update is None."""
    if update is None:
        return 0.0
    if update.keep is not None:
        x = x * update.keep.astype(x.dtype)
    hidden_xR = jnp.tensordot(x, update.a, axes=update.a.ndim - 1)
    return jnp.tensordot(hidden_xR, update.b, axes=1).astype(x.dtype)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale.

    Args:
      x: `[..., dim]`.
      scale: `[dim]` learned gain.
      eps: added to the mean square.

    Returns:
      `[..., dim]` in x.dtype. Statistics and the product with `scale` are float32, then cast back (as transformers'
      Llama/Qwen/DeepSeek norms do, except that they cast before multiplying by the weight; float32 is the more exact).
    """
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm scale.shape={scale.shape} must be [dim] = {x.shape[-1:]}")
    x32 = x.astype(jnp.float32)
    inverse_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inverse_rms * scale.astype(jnp.float32)).astype(x.dtype)


def swiglu(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray,
           updates: Sequence[Optional[LowRank]] = (None, None, None)) -> jnp.ndarray:
    """SwiGLU MLP (Shazeer 2020): (silu(x W_gate) * x W_up) W_down.

    Args:
      x: `[..., d]`.
      w_gate, w_up: `[d, f]`.
      w_down: `[f, d]`.
      updates: the LoRA updates of (w_gate, w_up, w_down), each a `LowRank` or None; the keep masks of the first
        two are shaped like x, that of w_down `[..., f]`.

    Returns:
      `[..., d]` in x.dtype.
    """
    if w_gate.shape != w_up.shape or w_gate.shape[0] != x.shape[-1] or w_down.shape != w_gate.shape[::-1]:
        raise ValueError(
            f"swiglu expects w_gate, w_up [d, f] and w_down [f, d] with d = x.shape[-1] = {x.shape[-1]}, got "
            f"w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape}"
        )
    gate_update, up_update, down_update = updates
    gate_xF = jnp.einsum("...d,df->...f", x, w_gate) + low_rank(x, gate_update)
    up_xF = jnp.einsum("...d,df->...f", x, w_up) + low_rank(x, up_update)
    hidden_xF = jax.nn.silu(gate_xF) * up_xF
    return (jnp.einsum("...f,fd->...d", hidden_xF, w_down) + low_rank(hidden_xF, down_update)).astype(x.dtype)
