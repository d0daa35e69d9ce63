"""Rotary position embeddings (RoPE) and their context-extension scalings.

Frequencies are computed once, in float64 numpy on static Python numbers, and returned as float32; the rotation itself
is a pure JAX function of per-token positions, so packed documents (positions restarting at 0) need nothing special.

Scalings follow Hugging Face `transformers.modeling_rope_utils` so imported checkpoints match:
- "linear": positions divided by `factor` (Chen et al. 2023, position interpolation).
- "ntk": static NTK-aware base change, theta' = theta * factor**(d / (d - 2)) (bloc97, 2023). transformers' "dynamic"
  equals this only at one sequence length; at or below max_position_embeddings it is plain RoPE.
- "yarn": Peng et al. 2023 ("YaRN"), with DeepSeek's mscale / mscale_all_dim attention temperature.
- "llama3": Llama 3.1's wavelength-banded scaling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, get_args

import jax.numpy as jnp
import numpy as np

RopeScalingKind = Literal["linear", "ntk", "yarn", "llama3"]
# "rotate_half": pair i is (x[i], x[i + dim/2]) (transformers); "interleaved": pair i is (x[2i], x[2i+1]) (DeepSeek).
RopeLayout = Literal["rotate_half", "interleaved"]
_KINDS = get_args(RopeScalingKind)
_LAYOUTS = get_args(RopeLayout)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE context extension (plain data; `jaxopd.model.ModelConfig.rope_scaling` holds one). `kind` is one of
    "linear", "ntk" (dynamic-free NTK-aware base change), "yarn", "llama3"; see the module docstring."""

    kind: RopeScalingKind
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    # YaRN (Peng et al. 2023): the correction range in rotations, and the attention temperature.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Llama 3.1 frequency-dependent scaling.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


def _get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (YaRN eq. 22), with DeepSeek's multiplier on ln(s)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_range(
    head_dim: int, theta: float, beta_fast: float, beta_slow: float, original_max_len: int, truncate: bool
) -> tuple[float, float]:
    """Rotary pair indices where the ramp between extrapolation and interpolation starts and ends.

    A pair with inverse frequency theta**(-2i/d) turns L / (2 pi theta**(2i/d)) times over the original context L;
    solving for i at beta rotations gives i = d ln(L / (2 pi beta)) / (2 ln theta) (YaRN sec. 3.2, "by-parts").
    `truncate` floors/ceils to whole pairs as DeepSeek's reference and transformers (default) do.
    """

    def pair_index(rotations: float) -> float:
        return head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _yarn_inv_freq(
    inv_freq: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling, truncate: bool = True
) -> np.ndarray:
    """YaRN "NTK-by-parts": high-frequency pairs keep their frequency, low-frequency pairs are interpolated by factor."""
    low, high = _yarn_correction_range(
        head_dim, theta, scaling.beta_fast, scaling.beta_slow, scaling.original_max_position_embeddings, truncate
    )
    if low == high:
        high += 0.001  # avoid 0/0 when the ramp collapses to a step
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp  # 1 for fast-rotating pairs (below `low`), 0 beyond `high`
    return inv_freq / scaling.factor * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3.1: wavelengths longer than L/low_freq_factor are interpolated by factor, shorter than
    L/high_freq_factor kept, and the band between blended linearly in L / wavelength."""
    original_len = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength > original_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    medium = (wavelength >= original_len / scaling.high_freq_factor) & (
        wavelength <= original_len / scaling.low_freq_factor
    )
    return np.where(medium, blended, scaled)


def check_rope_scaling(scaling: RopeScaling) -> None:
    """Raise ValueError for a scaling `rope_frequencies` cannot compute (unknown kind, factor <= 0, llama3 band)."""
    if scaling.kind not in _KINDS:
        raise ValueError(f"rope scaling kind={scaling.kind!r} is unknown: use one of {_KINDS} or scaling=None")
    if not scaling.factor > 0:
        raise ValueError(f"rope scaling factor={scaling.factor} must be > 0 (1.0 means no extension)")
    if scaling.kind == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
        raise ValueError(
            f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
            f"{scaling.high_freq_factor} <= {scaling.low_freq_factor}"
        )


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies of the rotary pairs and the factor to multiply cos/sin by.

    Args:
      head_dim: rotated dimensions per head (even); for MLA this is qk_rope_head_dim.
      theta: RoPE base.
      scaling: context extension, or None for plain RoPE.

    Returns:
      inv_freq `[head_dim // 2]` float32, and attention_scale (YaRN's mscale ratio; 1.0 for other kinds), which
      transformers multiplies into cos and sin (pass it to `apply_rope`).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be a positive even number: RoPE rotates pairs of dimensions")
    if not theta > 0:
        raise ValueError(f"rope theta={theta} must be > 0")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    attention_scale = 1.0
    if scaling is None:
        inv_freq = theta**-exponents
    else:
        check_rope_scaling(scaling)
        if scaling.kind == "ntk":
            inv_freq = (theta * scaling.factor ** (head_dim / (head_dim - 2))) ** -exponents
        elif scaling.kind == "linear":
            inv_freq = theta**-exponents / scaling.factor
        elif scaling.kind == "llama3":
            inv_freq = _llama3_inv_freq(theta**-exponents, scaling)
        else:
            # `truncate` is a transformers rope parameter (False for e.g. gpt-oss); RopeScaling may not carry it.
            truncate = getattr(scaling, "truncate", True)
            inv_freq = _yarn_inv_freq(theta**-exponents, head_dim, theta, scaling, truncate)
            # transformers uses DeepSeek's ratio only when both are set (truthy); otherwise YaRN eq. 22.
            if scaling.mscale and scaling.mscale_all_dim:
                attention_scale = _get_mscale(scaling.factor, scaling.mscale) / _get_mscale(
                    scaling.factor, scaling.mscale_all_dim
                )
            else:
                attention_scale = _get_mscale(scaling.factor)
    return inv_freq.astype(np.float32), float(attention_scale)


def yarn_softmax_scale_factor(scaling: Optional[RopeScaling]) -> float:
    """Multiplier for the softmax scale: DeepSeek's get_mscale(factor, mscale_all_dim)**2, else 1.0.

    DeepSeek-V2/V3 put the YaRN temperature on the logits of all dimensions (nope and rope), not only on the rotated
    ones, so with mscale == mscale_all_dim the cos/sin factor is 1 and the whole effect is here. Like transformers,
    this applies whenever a scaling with a nonzero mscale_all_dim is given.
    """
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    return _get_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    inv_freq: jnp.ndarray,
    layout: str = "rotate_half",
    attention_scale: float = 1.0,
) -> jnp.ndarray:
    """Rotate `x` by angle position * inv_freq per pair of dimensions.

    Args:
      x: `[batch, seq, heads, dim]`, dim == 2 * len(inv_freq).
      positions: `[batch, seq]` integer positions (restart at 0 in each packed document).
      inv_freq: `[dim // 2]` from `rope_frequencies`.
      layout: "rotate_half": pair i is (x[i], x[i + dim/2]) (transformers Llama/Qwen/DeepSeek without interleave).
        "interleaved": pair i is (x[2i], x[2i+1]) (DeepSeek reference; HF `rope_interleave=True`). The output keeps
        the input layout; transformers' interleave function returns the same rotated pairs de-interleaved
        (evens then odds), which leaves every q.k dot product unchanged.
      attention_scale: multiplies cos and sin (YaRN mscale), from `rope_frequencies`.

    Returns:
      `[batch, seq, heads, dim]` in x.dtype (math in float32).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"rope layout={layout!r} is unknown: use one of {_LAYOUTS}")
    if x.ndim != 4 or x.shape[-1] != 2 * inv_freq.shape[-1]:
        raise ValueError(
            f"apply_rope expects x [batch, seq, heads, dim] with dim = 2 * len(inv_freq) = {2 * inv_freq.shape[-1]}, "
            f"got x.shape={x.shape}"
        )
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions.shape={positions.shape} must be [batch, seq] = {x.shape[:2]}")
    angle_BxTxP = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos_BxTx1xP = (jnp.cos(angle_BxTxP) * attention_scale)[:, :, None, :]
    sin_BxTx1xP = (jnp.sin(angle_BxTxP) * attention_scale)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout == "rotate_half":
        first, second = jnp.split(x32, 2, axis=-1)
    else:
        first, second = x32[..., 0::2], x32[..., 1::2]
    rotated_first = first * cos_BxTx1xP - second * sin_BxTx1xP
    rotated_second = second * cos_BxTx1xP + first * sin_BxTx1xP
    if layout == "rotate_half":
        out = jnp.concatenate([rotated_first, rotated_second], axis=-1)
    else:
        out = jnp.stack([rotated_first, rotated_second], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
