"""Small dense layers shared by every architecture: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def swiglu(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray) -> jnp.ndarray:
    """SwiGLU MLP (Shazeer 2020): (silu(x W_gate) * x W_up) W_down.

    Args:
      x: `[..., d]`.
      w_gate, w_up: `[d, f]`.
      w_down: `[f, d]`.

    Returns:
      `[..., d]` in x.dtype.
    """
    if w_gate.shape != w_up.shape or w_gate.shape[0] != x.shape[-1] or w_down.shape != w_gate.shape[::-1]:
        raise ValueError(
            f"swiglu expects w_gate, w_up [d, f] and w_down [f, d] with d = x.shape[-1] = {x.shape[-1]}, got "
            f"w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape}"
        )
    gate_xF = jnp.einsum("...d,df->...f", x, w_gate)
    up_xF = jnp.einsum("...d,df->...f", x, w_up)
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate_xF) * up_xF, w_down).astype(x.dtype)
