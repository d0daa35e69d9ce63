"""DeepSeek-V3's block-wise fp8 weights: float8_e4m3fn tiles, each with one float32 multiplier (`*_scale_inv`)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FP8_BLOCK = (128, 128)  # DeepSeek-V3's `quantization_config.weight_block_size`


def dequantize_fp8_blockwise(weight: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = FP8_BLOCK) -> np.ndarray:
    """float32 `weight * scale_inv`, one scale per `block` tile (DeepSeek-V3 fp8 format; edge tiles are partial).

    Args:
      weight: `[rows, cols]` float8_e4m3fn (or any float) weight.
      scale_inv: `[ceil(rows / block[0]), ceil(cols / block[1])]` per-tile multipliers.
    Returns: `[rows, cols]` float32.
    """
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if scale_inv.shape != expected:
        raise ValueError(f"fp8 scale_inv shape {scale_inv.shape} does not tile weight {weight.shape} in {tuple(block)} "
                         f"blocks; expected {expected}")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
    return weight.astype(np.float32) * scale
