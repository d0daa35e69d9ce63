"""jaxopd.hf.fp8: DeepSeek's block-wise fp8 dequantization, also as read from a safetensors file."""

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch_file

from jaxopd.hf.fp8 import dequantize_fp8_blockwise
from jaxopd.hf.safetensors_io import SafetensorsReader


def _quantize_blockwise_float64(weight, block=128):
    """Reference fp8 quantization: per 128x128 tile scale = max|w| / 448 (e4m3 max), stored as scale_inv."""
    rows, cols = weight.shape
    scale_inv = np.zeros((-(-rows // block), -(-cols // block)))
    quantized = np.zeros_like(weight)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale_inv[i, j] = np.abs(tile).max() / 448.0
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = tile / scale_inv[i, j]
    fp8 = torch.from_numpy(quantized).to(torch.float8_e4m3fn)
    expected = np.zeros_like(weight)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows_, cols_ = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            expected[rows_, cols_] = fp8[rows_, cols_].to(torch.float64).numpy() * scale_inv[i, j]
    return fp8, torch.from_numpy(scale_inv.astype(np.float32)), expected


def test_fp8_blockwise_dequantization_with_partial_edge_blocks(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (300, 200)) * rng.uniform(0.1, 10, (300, 1))  # tiles with very different ranges
    fp8, scale_inv, expected = _quantize_blockwise_float64(weight)
    save_torch_file({"w.weight": fp8, "w.weight_scale_inv": scale_inv, "b": torch.ones(3)},
                    tmp_path / "model.safetensors")
    checkpoint = SafetensorsReader(tmp_path)
    loaded = checkpoint.read("w.weight", (128, 128))
    assert loaded.dtype == np.float32 and loaded.shape == (300, 200)
    np.testing.assert_allclose(loaded, expected, rtol=1e-6, atol=0)
    # e4m3 keeps 3 mantissa bits; its smallest step (subnormals) is 2^-9 of the tile's scale.
    step = np.kron(scale_inv.numpy().astype(np.float64), np.ones((128, 128)))[:300, :200] * 2.0**-9
    assert np.all(np.abs(loaded - weight) <= 2.0**-4 * np.abs(weight) + step)
    np.testing.assert_array_equal(checkpoint.read("b", (128, 128)), np.ones(3, np.float32))


def test_dequantize_rejects_scales_that_do_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_fp8_blockwise(np.zeros((300, 200), ml_dtypes.float8_e4m3fn), np.ones((2, 2), np.float32))
